// Test support: a fresh PostgreSQL database per test and the real
// windflow-notify binary serving it, plus HS256 tokens and SQL writes.
import { spawn, type ChildProcess } from 'node:child_process'
import { createHmac, randomUUID } from 'node:crypto'
import { existsSync } from 'node:fs'
import { createServer } from 'node:net'
import { dirname, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import pg from 'pg'
import WebSocket from 'ws'

export const SECRET = 'node-test-secret'
/** How long a test waits for something that should happen. */
export const WAIT = 20_000

const clientsDir = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const adminUrl = process.env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres'

/** The binary under test: WINDFLOW_BIN (set by `cargo test`), else target/debug. */
export function binary(): string {
  const path = process.env.WINDFLOW_BIN ?? resolve(clientsDir, '../target/debug/windflow-notify')
  if (!existsSync(path)) throw new Error(`${path} not found: run \`cargo build\` first or set WINDFLOW_BIN`)
  return path
}

export interface Database {
  name: string
  url: string
  drop(): Promise<void>
}

export async function createDatabase(): Promise<Database> {
  const name = `wf_node_${randomUUID().replaceAll('-', '')}`
  const admin = new pg.Client({ connectionString: adminUrl })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  await admin.end()
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  return {
    name,
    url: url.toString(),
    async drop() {
      const admin = new pg.Client({ connectionString: adminUrl })
      await admin.connect()
      await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
      await admin.end()
    },
  }
}

/** A plain SQL connection, as any backend writer has (call after the server migrated). */
export async function connectWriter(database: Database): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: database.url })
  await client.connect()
  return client
}

export async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer()
    server.once('error', fail)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address ? address.port : 0
      server.close(() => done(port))
    })
  })
}

export interface Server {
  port: number
  process: ChildProcess
  /** Lines the process printed on stdout so far. */
  stdout: string[]
  /** Resolves with the first stdout line matching `pattern`. */
  line(pattern: RegExp): Promise<string>
  stop(): Promise<void>
}

/** Run `windflow-notify <command>` (serve or demo) and wait until /healthz answers 200. */
export async function startServer(
  database: Database,
  { command = 'serve', port }: { command?: 'serve' | 'demo'; port?: number } = {},
): Promise<Server> {
  const bind = port ?? (await freePort())
  const child = spawn(binary(), [command], {
    env: {
      ...process.env,
      DATABASE_URL: database.url,
      JWT_SECRET_KEY: SECRET,
      WINDFLOW_BIND: `127.0.0.1:${bind}`,
      RUST_LOG: process.env.TEST_LOG ? 'info' : 'warn',
    },
    stdio: ['ignore', 'pipe', process.env.TEST_LOG ? 'inherit' : 'ignore'],
  })
  const stdout: string[] = []
  const waiters: Array<{ pattern: RegExp; done: (line: string) => void }> = []
  createInterface({ input: child.stdout! }).on('line', (line) => {
    stdout.push(line)
    for (const waiter of waiters.filter((w) => w.pattern.test(line))) {
      waiters.splice(waiters.indexOf(waiter), 1)
      waiter.done(line)
    }
  })
  const exited = new Promise<void>((done) => child.once('exit', () => done()))
  const server: Server = {
    port: bind,
    process: child,
    stdout,
    line(pattern) {
      const seen = stdout.find((line) => pattern.test(line))
      if (seen) return Promise.resolve(seen)
      return withTimeout(new Promise((done) => waiters.push({ pattern, done })), `a stdout line matching ${pattern}`)
    },
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM')
      await withTimeout(exited, 'the server to exit')
    },
  }
  await until(async () => {
    if (child.exitCode !== null) throw new Error(`windflow-notify ${command} exited with ${child.exitCode}`)
    try {
      return (await fetch(`http://127.0.0.1:${bind}/healthz`)).status === 200
    } catch {
      return false
    }
  }, `windflow-notify ${command} to answer /healthz`)
  return server
}

/** Poll `condition` until it holds; fail after WAIT. */
export async function until(condition: () => boolean | Promise<boolean>, what: string, timeout = WAIT): Promise<void> {
  const deadline = Date.now() + timeout
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`)
    await new Promise((done) => setTimeout(done, 50))
  }
}

export function withTimeout<T>(promise: Promise<T>, what: string, timeout = WAIT): Promise<T> {
  let timer: NodeJS.Timeout
  return Promise.race([
    promise,
    new Promise<T>((_, fail) => {
      timer = setTimeout(() => fail(new Error(`timed out after ${timeout} ms waiting for ${what}`)), timeout)
    }),
  ]).finally(() => clearTimeout(timer))
}

/** An HS256 JWT with the claims WindFlow's API issues. */
export function token(
  sub: string,
  { organizationId, ttl = 3600, superuser = false }: { organizationId?: string; ttl?: number; superuser?: boolean } = {},
): string {
  const encode = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url')
  const claims: Record<string, unknown> = { sub, exp: Math.floor(Date.now() / 1000) + ttl }
  if (organizationId) claims.organization_id = organizationId
  if (superuser) claims.is_superuser = true
  const unsigned = `${encode({ alg: 'HS256', typ: 'JWT' })}.${encode(claims)}`
  return `${unsigned}.${createHmac('sha256', SECRET).update(unsigned).digest('base64url')}`
}

export async function createDeployment(sql: pg.Client, owner: string, name = 'app'): Promise<string> {
  const result = await sql.query('INSERT INTO deployments (user_id, name) VALUES ($1, $2) RETURNING id', [owner, name])
  return result.rows[0].id
}

/** Every socket a client opened through `Recorder.WebSocket`, with what it sent and received. */
export interface RecordedSocket {
  sent: Array<Record<string, unknown>>
  received: Array<Record<string, unknown>>
  closed: boolean
}

/** A `ws` WebSocket that records its sockets, for counting connections and frames. */
export function recordingWebSocket(): { WebSocket: unknown; sockets: RecordedSocket[] } {
  const sockets: RecordedSocket[] = []
  class Recorded extends WebSocket {
    constructor(url: string) {
      super(url)
      const record: RecordedSocket = { sent: [], received: [], closed: false }
      sockets.push(record)
      const send = this.send.bind(this)
      this.send = ((data: string) => {
        record.sent.push(JSON.parse(data))
        send(data)
      }) as typeof this.send
      this.on('message', (data) => record.received.push(JSON.parse(String(data))))
      this.on('close', () => (record.closed = true))
    }
  }
  return { WebSocket: Recorded, sockets }
}

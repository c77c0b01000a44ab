// The fixture app (clients/fixture-app/): Vue 3 + Vite 8 + vue-tsc 3, with
// the package installed as the README says (`npm install <checkout>/clients`,
// a link). It must type-check and build for the browser and for SSR, also
// from a checkout that never ran `npm ci`; and in Chromium, against the
// real server, its views must share one socket, replay only what they
// show, stop on errors retrying cannot fix, and catch up after a restart.
import assert from 'node:assert/strict'
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { cpSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, realpathSync, rmSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { promisify } from 'node:util'
import type pg from 'pg'
import type { Page, WebSocket as PageSocket } from 'playwright-core'
import { launchChromium, noChromium, type Browser } from '../support/browser.js'
import {
  connectWriter,
  createDatabase,
  createDeployment,
  freePort,
  startServer,
  token,
  until,
  withTimeout,
  WAIT,
  type Database,
  type Server,
} from '../support/server.js'

const run = promisify(execFile)
const clientsDir = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const app = join(clientsDir, 'fixture-app')
const bin = (dir: string, name: string) => join(dir, 'node_modules', '.bin', name)
const [major, minor] = process.versions.node.split('.').map(Number)
const noFixture = !existsSync(join(app, 'node_modules'))
  ? 'clients/fixture-app/node_modules is missing: run `npm ci --prefix clients/fixture-app` (.ci/run does)'
  : major < 20 || (major === 20 && minor < 19)
    ? `Vite 8 needs Node.js 20.19 or newer; this is ${process.versions.node}`
    : false

/** vue-tsc, `vite build` and `vite build --ssr` in `dir`, as the app's own scripts run them. */
async function typecheckAndBuild(dir: string): Promise<void> {
  const steps: Array<[string, string[]]> = [
    ['vue-tsc', ['--noEmit']],
    ['vite', ['build', '--logLevel', 'warn']],
    ['vite', ['build', '--ssr', 'src/entry-server.ts', '--outDir', 'dist-ssr', '--logLevel', 'warn']],
  ]
  for (const [tool, args] of steps) {
    try {
      await run(bin(dir, tool), args, { cwd: dir, timeout: 180_000 })
    } catch (error) {
      const { stdout, stderr } = error as { stdout?: string; stderr?: string }
      assert.fail(`${tool} ${args.join(' ')} failed in ${dir}:\n${stdout}\n${stderr}`)
    }
  }
}

describe('the fixture app', { skip: noFixture }, () => {
  test('is installed as the README says: a link to the checkout', () => {
    const installed = join(app, 'node_modules', 'windflow-notify-clients')
    assert.ok(lstatSync(installed).isSymbolicLink())
    assert.equal(realpathSync(installed), realpathSync(clientsDir))
  })

  test('type-checks with vue-tsc and builds for the browser and for SSR', { timeout: 300_000 }, async () => {
    await typecheckAndBuild(app)
  })

  test('also from a checkout whose clients/ has no node_modules (no `vue` of its own)', { timeout: 300_000 }, async () => {
    const root = mkdtempSync(join(tmpdir(), 'windflow-bare-'))
    try {
      // The checkout: only what a fresh clone has of the package.
      const checkout = join(root, 'checkout', 'clients')
      mkdirSync(checkout, { recursive: true })
      for (const name of ['package.json', 'lib']) cpSync(join(clientsDir, name), join(checkout, name), { recursive: true })
      // The app: its sources, and its installed packages but for the link.
      const copy = join(root, 'app')
      mkdirSync(join(copy, 'node_modules'), { recursive: true })
      for (const name of ['src', 'index.html', 'package.json', 'tsconfig.json', 'vite.config.ts']) {
        cpSync(join(app, name), join(copy, name), { recursive: true })
      }
      for (const name of readdirSync(join(app, 'node_modules'))) {
        if (name === 'windflow-notify-clients') continue
        symlinkSync(join(app, 'node_modules', name), join(copy, 'node_modules', name))
      }
      symlinkSync(checkout, join(copy, 'node_modules', 'windflow-notify-clients'))
      await typecheckAndBuild(copy)
    } finally {
      rmSync(root, { recursive: true, force: true })
    }
  })

  test('renders on the server: initial values shown, no socket opened, no token asked for', async () => {
    const opened: string[] = []
    const global = globalThis as { WebSocket?: unknown }
    const saved = global.WebSocket
    global.WebSocket = class {
      constructor(url: string) {
        opened.push(url)
      }
    }
    try {
      const { render } = await import(pathToFileURL(join(app, 'dist-ssr', 'entry-server.js')).href)
      const initial = { status: 'running', progress: 40, logs: [{ message: 'from the API', timestamp: '2030-01-01T00:00:00Z' }] }
      const html: string = await render(`?ids=${randomUUID()}&initial=${encodeURIComponent(JSON.stringify(initial))}`)
      assert.match(html, /data-status="running"/)
      assert.match(html, /data-progress="40"/)
      assert.match(html, /<li data-event-id="">from the API<\/li>/)
      assert.deepEqual(opened, [])
    } finally {
      global.WebSocket = saved
    }
  })

  describe('in Chromium, against the server', { skip: noChromium }, () => {
    let database: Database
    let server: Server | null = null
    let sql: pg.Client
    let preview: ChildProcess | null = null
    let origin = ''
    let browser: Browser

    before(async () => {
      database = await createDatabase()
      server = await startServer(database)
      sql = await connectWriter(database)
      const port = await freePort()
      preview = spawn(bin(app, 'vite'), ['preview', '--host', '127.0.0.1', '--port', String(port), '--strictPort'], {
        cwd: app,
        env: { ...process.env, WINDFLOW_URL: `http://127.0.0.1:${server.port}` },
        stdio: ['ignore', 'ignore', process.env.TEST_LOG ? 'inherit' : 'ignore'],
      })
      origin = `http://127.0.0.1:${port}`
      await until(async () => {
        try {
          return (await fetch(origin)).ok
        } catch {
          return false
        }
      }, 'vite preview to answer')
      browser = await launchChromium()
    })

    after(async () => {
      await browser?.close()
      if (preview && preview.exitCode === null) {
        const exited = new Promise((done) => preview!.once('exit', done))
        preview.kill('SIGTERM')
        await withTimeout(exited, 'vite preview to exit')
      }
      await sql?.end()
      await server?.stop()
      await database?.drop()
    })

    const log = (id: string, message: string) =>
      sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, message])

    /** A page of the app, with every socket it opens and the frames on them. */
    async function open(query: Record<string, string>) {
      const page = await browser.context.newPage()
      const problems: string[] = []
      page.on('pageerror', (error) => problems.push(String(error)))
      const sockets: Array<{ socket: PageSocket; received: Array<Record<string, any>>; sent: Array<Record<string, any>> }> = []
      page.on('websocket', (socket) => {
        const record = { socket, received: [] as Array<Record<string, any>>, sent: [] as Array<Record<string, any>> }
        sockets.push(record)
        socket.on('framereceived', (frame) => record.received.push(JSON.parse(String(frame.payload))))
        socket.on('framesent', (frame) => record.sent.push(JSON.parse(String(frame.payload))))
      })
      await page.goto(`${origin}/?${new URLSearchParams(query)}`)
      return { page, sockets, problems }
    }

    const view = (page: Page, which: 'selected' | 'pinned') => page.locator(`#${which}`)
    const lines = (page: Page, which: 'selected' | 'pinned') =>
      view(page, which).locator('.logs li').evaluateAll((items) => items.map((item) => item.textContent?.trim()))
    const waitFor = (page: Page, selector: string) => page.locator(selector).waitFor({ timeout: WAIT })

    test('two views share one socket, and switching replays only the new deployment', async () => {
      const owner = randomUUID()
      const [a, b] = [await createDeployment(sql, owner, 'a'), await createDeployment(sql, owner, 'b')]
      for (let i = 0; i < 20; i += 1) await log(await createDeployment(sql, owner, `other-${i}`), 'not shown')
      await log(b, 'b one')
      await log(b, 'b two')
      const { page, sockets, problems } = await open({ token: token(owner), ids: `${a},${b}`, pinned: a })
      try {
        await waitFor(page, '#selected[data-state="open"][data-status="pending"]')
        await waitFor(page, '#pinned[data-state="open"][data-status="pending"]')
        assert.equal(sockets.length, 1, 'one socket for the page')
        const before = sockets[0].received.length
        await page.click(`[data-select="${b}"]`)
        await waitFor(page, `#selected[data-deployment-id="${b}"] .logs li:nth-child(2)`)
        await log(b, 'b three')
        await waitFor(page, `#selected .logs li:nth-child(3)`)
        assert.deepEqual(await lines(page, 'selected'), ['b one', 'b two', 'b three'])
        const downloaded = sockets[0].received.slice(before).filter((m) => typeof m.event_id === 'number')
        assert.ok(downloaded.length > 0)
        assert.ok(downloaded.every((m) => m.data.deployment_id === b), `only b's events: ${JSON.stringify(downloaded)}`)
        assert.equal(await view(page, 'pinned').getAttribute('data-deployment-id'), a)
        assert.equal(sockets.length, 1, 'the switch kept the socket')
        assert.deepEqual(problems, [])
      } finally {
        await page.close()
      }
    })

    test('initial lines (from the REST API) and the replay show each line once', async () => {
      const owner = randomUUID()
      const id = await createDeployment(sql, owner)
      await log(id, 'one')
      await log(id, 'two')
      const { rows } = await sql.query('SELECT message, created_at FROM deployment_logs WHERE deployment_id = $1 ORDER BY id', [id])
      const initial = { status: 'deploying', logs: rows.map((row) => ({ message: row.message, timestamp: row.created_at.toISOString() })) }
      const { page } = await open({ token: token(owner), ids: id, initial: JSON.stringify(initial) })
      try {
        await waitFor(page, '#selected[data-state="open"] .logs li[data-event-id]:not([data-event-id=""]):nth-child(2)')
        await log(id, 'three')
        await waitFor(page, '#selected .logs li:nth-child(3)')
        assert.deepEqual(await lines(page, 'selected'), ['one', 'two', 'three'])
      } finally {
        await page.close()
      }
    })

    test('a WebSocket URL the dev server does not proxy shows `upgrade_refused`, not a silent retry', async () => {
      const unproxied = `${origin.replace('http', 'ws')}/not-proxied`
      const { page } = await open({ token: token(randomUUID()), ids: randomUUID(), url: unproxied })
      try {
        const error = view(page, 'selected').locator('.error[data-code="upgrade_refused"]')
        await error.waitFor({ timeout: WAIT })
        assert.match((await error.textContent()) ?? '', /answered HTTP 200 \(text\/html\) instead of a WebSocket upgrade/)
        assert.equal(await view(page, 'selected').getAttribute('data-state'), 'reconnecting')
      } finally {
        await page.close()
      }
    })

    test('a refused token shows `unauthorized` and opens no socket until the token function gives another', async () => {
      const owner = randomUUID()
      const id = await createDeployment(sql, owner)
      const { page, sockets } = await open({ token: 'not-a-token', ids: id })
      try {
        await waitFor(page, '#selected[data-state="unauthorized"] .error[data-code="unauthorized"]')
        const asked = () => page.evaluate(() => (window as unknown as { fixture: { asked: number } }).fixture.asked)
        const before = await asked()
        await until(async () => (await asked()) >= before + 3, 'the token function, asked again')
        assert.equal(sockets.length, 1, 'the refused token is not tried again')
        await page.evaluate((fresh) => ((window as unknown as { fixture: { token: string } }).fixture.token = fresh), token(owner))
        await waitFor(page, '#selected[data-state="open"][data-status="pending"]')
        assert.equal(sockets.length, 2)
        assert.equal(await view(page, 'selected').locator('.error').count(), 0)
      } finally {
        await page.close()
      }
    })

    test('after a restart the page catches up within 2 s of the server answering; a forbidden view stays refused', async (t) => {
      const owner = randomUUID()
      const id = await createDeployment(sql, owner)
      const theirs = await createDeployment(sql, randomUUID())
      const { page, sockets, problems } = await open({ token: token(owner), ids: id, pinned: theirs })
      try {
        await waitFor(page, '#selected[data-state="open"][data-status="pending"]')
        await waitFor(page, '#pinned[data-state="forbidden"] .error[data-code="forbidden"]')
        // Topics are asked for in a connection's `auth` (resume at connect) or, once open, by `subscribe`.
        const asked = (record: (typeof sockets)[number], deployment: string) =>
          record.sent
            .flatMap((m) => (m.type === 'subscribe' ? [String(m.topic)] : m.type === 'auth' ? ((m.topics ?? []) as string[]) : []))
            .filter((topic) => topic.endsWith(deployment)).length
        assert.equal(asked(sockets[0], theirs), 3, 'each of its topics asked for once')

        const port = server!.port
        await server!.stop()
        server = null
        await waitFor(page, '#selected[data-state="reconnecting"]')
        await log(id, 'written while down')
        server = await startServer(database, { port })
        const answered = Date.now()
        await waitFor(page, '#selected .logs li')
        const caughtUp = Date.now() - answered
        t.diagnostic(`caught up ${caughtUp} ms after the server answered`)
        assert.ok(caughtUp < 2000, `caught up ${caughtUp} ms after the server answered`)

        assert.deepEqual(await lines(page, 'selected'), ['written while down'])
        assert.equal(await view(page, 'pinned').getAttribute('data-state'), 'forbidden')
        const last = sockets.at(-1)!
        await until(() => last.sent.some((m) => m.type === 'auth'), 'the resume')
        assert.equal(asked(last, id), 3, 'the reconnect names the followed deployment’s topics in auth')
        assert.equal(last.sent.filter((m) => m.type === 'subscribe').length, 0, 'and subscribes nothing after')
        assert.equal(asked(last, theirs), 0, 'a forbidden deployment is not asked for again')
        assert.deepEqual(problems, [])
      } finally {
        await page.close()
      }
    })
  })
})

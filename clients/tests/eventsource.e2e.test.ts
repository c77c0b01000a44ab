// GET /events through the browser's own EventSource, in headless Chromium,
// against the real binary on a fresh database (SPEC §8, docs/protocol.md
// "Server-Sent Events"): `ready` first, then each event with its id; a
// server restart that EventSource rides out by itself with Last-Event-ID,
// every event once and in commit order; a refused stream is not retried.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { test } from 'node:test'
import type { Page, Request } from 'playwright-core'
import type pg from 'pg'
import { launchChromium, noChromium } from '../support/browser.js'
import { connectWriter, createDatabase, createDeployment, startServer, token, until, WAIT, type Server } from '../support/server.js'

/** What the page's EventSource did, in order: opens, errors and named events. */
interface Seen {
  kind: string
  /** The event's `lastEventId`. */
  id?: string
  data?: string
  /** EventSource.readyState when `error` fired. */
  readyState?: number
}

interface Recorder {
  seen: Seen[]
  source: EventSource
}

/** The event names the server sends on a stream (SPEC §3, §8). */
const NAMES = ['ready', 'DEPLOYMENT_STATUS_CHANGED', 'DEPLOYMENT_PROGRESS', 'DEPLOYMENT_LOGS_UPDATE', 'resync', 'token_expired']
const CLOSED = 2

/** Open `new EventSource(url)` in the page, recording into `window.seen`. */
async function openEventSource(page: Page, url: string): Promise<void> {
  await page.evaluate(
    ({ url, names }) => {
      const recorder = window as unknown as Recorder
      recorder.seen = []
      const source = new EventSource(url)
      recorder.source = source
      source.onopen = () => recorder.seen.push({ kind: 'open' })
      source.onerror = () => recorder.seen.push({ kind: 'error', readyState: source.readyState })
      for (const kind of names) {
        source.addEventListener(kind, (event) => {
          const message = event as MessageEvent<string>
          recorder.seen.push({ kind, id: message.lastEventId, data: message.data })
        })
      }
    },
    { url, names: NAMES },
  )
}

const seen = (page: Page): Promise<Seen[]> => page.evaluate(() => (window as unknown as Recorder).seen)

/** Wait until the page has recorded something `what` matches; resolves with everything recorded. */
async function waitForSeen(page: Page, what: string, holds: (seen: Seen[]) => boolean): Promise<Seen[]> {
  let last: Seen[] = []
  await until(async () => holds((last = await seen(page))), what)
  return last
}

const events = (all: Seen[]) => all.filter((s) => s.id !== undefined && s.kind !== 'ready')
const readies = (all: Seen[]) => all.filter((s) => s.kind === 'ready')

/**
 * One writer, as a backend worker: a log line after another, and every
 * tenth a progress update (which only the owner feed carries), until
 * stopped. One connection and one statement at a time, so commit order is
 * the order of writing and of event ids. The short pause only keeps the
 * rate reasonable on a shared machine; nothing waits on it.
 */
function keepWriting(sql: pg.Client, deployment: string) {
  let running = true
  let rows = 0
  // Held, not thrown at once: a failed write fails the test at stop().
  const done = (async () => {
    while (running) {
      await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [deployment, `[INFO] line ${rows}`])
      rows += 1
      if (rows % 10 === 0) {
        await sql.query('UPDATE deployments SET progress = $2 WHERE id = $1', [deployment, (rows / 10) % 100])
      }
      await new Promise((resume) => setTimeout(resume, 5))
    }
  })().then(
    () => null,
    (error: unknown) => error,
  )
  return {
    rows: () => rows,
    async stop() {
      running = false
      const error = await done
      if (error) throw error
    },
  }
}

test('EventSource gets ready then every event with its id, and rides out a server restart with Last-Event-ID', { skip: noChromium, timeout: 180_000 }, async () => {
  const database = await createDatabase()
  let first: Server | null = null
  let second: Server | null = null
  let sql: pg.Client | null = null
  let writer: ReturnType<typeof keepWriting> | null = null
  const browser = await launchChromium()
  try {
    first = await startServer(database)
    const origin = `http://127.0.0.1:${first.port}`
    sql = await connectWriter(database)
    const owner = randomUUID()
    const deployment = await createDeployment(sql, owner, 'sse-e2e')
    const topic = `deployment_logs_${deployment}`

    const page = await browser.context.newPage()
    const problems: string[] = []
    page.on('pageerror', (error) => problems.push(String(error)))
    // What each request to /events carried, as the browser sent it.
    const requests: Array<Promise<Record<string, string>>> = []
    page.on('request', (request: Request) => {
      if (new URL(request.url()).pathname === '/events') requests.push(request.allHeaders())
    })
    // A page of the server's origin (EventSource cannot set headers: the token goes in the URL).
    await page.goto(`${origin}/healthz`)
    await openEventSource(page, `${origin}/events?topic=${topic}&token=${token(owner)}`)

    // The stream: `ready` first, its id the cursor; then what is written, in order.
    let all = await waitForSeen(page, 'ready', (s) => readies(s).length === 1)
    assert.deepEqual(all.map((s) => s.kind), ['open', 'ready'], 'open, then ready before anything else')
    const ready = JSON.parse(all[1].data!)
    assert.deepEqual(ready.topics, [topic])
    assert.equal(all[1].id, String(ready.event_id), 'ready’s id is its cursor')
    const cursor: number = ready.event_id
    await sql.query("UPDATE deployments SET status = 'deploying' WHERE id = $1", [deployment])
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [deployment, '[INFO] before'])
    all = await waitForSeen(page, 'the first two events', (s) => events(s).length >= 2)
    assert.deepEqual(events(all).map((s) => s.kind), ['DEPLOYMENT_STATUS_CHANGED', 'DEPLOYMENT_LOGS_UPDATE'], 'the owner feed’s status change, then the topic’s line')
    for (const event of events(all)) {
      const message = JSON.parse(event.data!)
      assert.equal(event.id, String(message.event_id), 'each event’s id is its event_id')
      assert.equal(message.type, event.kind)
    }

    // Restart on the same port while rows keep being written, also while it is down.
    const writing = keepWriting(sql, deployment)
    writer = writing
    await until(() => writing.rows() >= 30, 'rows written before the restart')
    const port = first.port
    await first.stop()
    first = null
    // The end of the stream is one error; a reconnect refused while the
    // server is down is another (EventSource waits ~3 s between tries).
    const errors = (s: Seen[]) => s.filter((x) => x.kind === 'error').length
    await waitForSeen(page, 'EventSource to notice the end of its stream', (s) => errors(s) >= 1)
    const writtenWhileDown = writing.rows() + 30
    await until(() => writing.rows() >= writtenWhileDown, 'rows written while the server is down')
    all = await waitForSeen(page, 'a reconnect refused while the server is down', (s) => errors(s) >= 2)
    assert.equal(readies(all).length, 1, 'no second stream while the server is down')
    assert.ok(
      all.filter((s) => s.kind === 'error').every((s) => s.readyState !== CLOSED),
      'EventSource keeps trying (CONNECTING), never gives up (CLOSED)',
    )
    const lastBefore = events(all).at(-1)!.id
    second = await startServer(database, { port })
    all = await waitForSeen(page, 'EventSource to reconnect by itself', (s) => readies(s).length === 2)
    const again = JSON.parse(readies(all)[1].data!)
    assert.equal(again.event_id, Number(lastBefore), 'the second stream resumes at the last id the page saw')
    await until(() => writing.rows() >= writtenWhileDown + 30, 'rows written after the restart')
    await writing.stop()
    await sql.query("UPDATE deployments SET status = 'running', progress = 100 WHERE id = $1", [deployment])
    const { rows: newest } = await sql.query('SELECT max(id)::text AS id FROM windflow_events WHERE deployment_id = $1', [deployment])
    all = await waitForSeen(page, 'the last event', (s) => events(s).some((e) => e.id === newest[0].id))

    // Every event of the deployment after the first cursor, once, in commit
    // order, no gap: exactly the event log's rows, and the log lines the table's.
    const { rows: log } = await sql.query(
      'SELECT id::text AS id, type FROM windflow_events WHERE deployment_id = $1 AND id > $2 ORDER BY windflow_events.id',
      [deployment, cursor],
    )
    const received = events(all)
    assert.deepEqual(received.map((e) => `${e.id} ${e.kind}`), log.map((row) => `${row.id} ${row.type}`))
    const { rows: lines } = await sql.query('SELECT message FROM deployment_logs WHERE deployment_id = $1 ORDER BY id', [deployment])
    const logs = received.filter((e) => e.kind === 'DEPLOYMENT_LOGS_UPDATE').map((e) => JSON.parse(e.data!).data.logs)
    assert.deepEqual(logs, lines.map((row) => row.message))
    assert.ok(received.some((e) => e.kind === 'DEPLOYMENT_PROGRESS'), 'the owner feed’s progress updates came too')
    for (const event of received) {
      const message = JSON.parse(event.data!)
      assert.equal(event.id, String(message.event_id), `lastEventId is the event_id of ${event.data}`)
      assert.equal(message.type, event.kind)
    }

    // Each stream opened, then `ready` first; the reconnect sent Last-Event-ID by itself.
    const kinds = all.map((s) => s.kind)
    for (const [at, kind] of kinds.entries()) {
      if (kind === 'open') assert.equal(kinds[at + 1], 'ready', `open at ${at} is followed by ready`)
    }
    assert.equal(kinds.filter((kind) => kind === 'open').length, 2)
    const headers = await Promise.all(requests)
    assert.ok(headers.length >= 3, 'the first request, a refused retry, the reconnect that got through')
    assert.equal(headers[0]['last-event-id'], undefined, 'the first request has no Last-Event-ID')
    // A request refused before it was sent shows Chromium's provisional
    // headers only; those that reached the server show all they carried.
    const sent = headers.slice(1).filter((h) => h.host !== undefined)
    assert.ok(sent.length >= 1 && sent.every((h) => h['last-event-id'] === lastBefore), 'the reconnect sent Last-Event-ID: the last id seen')
    assert.equal(await page.evaluate(() => (window as unknown as Recorder).source.readyState), 1, 'OPEN')
    assert.deepEqual(problems, [], 'no script errors on the page')
  } finally {
    // After a failed assertion: the writer stops before its database goes.
    await writer?.stop().catch(() => {})
    await browser.close()
    await sql?.end()
    await second?.stop()
    await first?.stop()
    await database.drop()
  }
})

test('EventSource refused (401 bad or expired token, 403 topic not yours) gets an error and stays CLOSED', { skip: noChromium, timeout: 120_000 }, async () => {
  const database = await createDatabase()
  let server: Server | null = null
  let sql: pg.Client | null = null
  const browser = await launchChromium()
  try {
    server = await startServer(database)
    const origin = `http://127.0.0.1:${server.port}`
    sql = await connectWriter(database)
    const someoneElses = await createDeployment(sql, randomUUID())
    const user = randomUUID()
    const refusals = [
      { why: 'a token signed with another key', url: `/events?token=${token(user).replace(/[^.]+$/, 'A'.repeat(43))}`, status: 401 },
      { why: 'an expired token', url: `/events?token=${token(user, { ttl: -60 })}`, status: 401 },
      { why: 'no token', url: '/events', status: 401 },
      { why: 'a topic not yours', url: `/events?topic=deployment_logs_${someoneElses}&token=${token(user)}`, status: 403 },
    ]
    const page = await browser.context.newPage()
    await page.goto(`${origin}/healthz`)
    for (const { why, url, status } of refusals) {
      const answered = page.waitForResponse((response) => response.url() === `${origin}${url}`, { timeout: WAIT })
      await openEventSource(page, `${origin}${url}`)
      assert.equal((await answered).status(), status, why)
      const all = await waitForSeen(page, `the error of ${why}`, (s) => s.some((x) => x.kind === 'error'))
      assert.deepEqual(all, [{ kind: 'error', readyState: CLOSED }], `${why}: one error, CLOSED, nothing else`)
      assert.equal(await page.evaluate(() => (window as unknown as Recorder).source.readyState), CLOSED, why)
    }
  } finally {
    await browser.close()
    await sql?.end()
    await server?.stop()
    await database.drop()
  }
})

test('EventSource from an app on another origin gets the stream (Access-Control-Allow-Origin)', { skip: noChromium, timeout: 120_000 }, async () => {
  const database = await createDatabase()
  let server: Server | null = null
  let sql: pg.Client | null = null
  // The app: a page on another port of the loopback, so another origin.
  const app = createServer((_, response) => response.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><title>app</title>'))
  await new Promise<void>((listening) => app.listen(0, '127.0.0.1', listening))
  const browser = await launchChromium()
  try {
    server = await startServer(database)
    const origin = `http://127.0.0.1:${server.port}`
    sql = await connectWriter(database)
    const owner = randomUUID()
    const deployment = await createDeployment(sql, owner)
    const page = await browser.context.newPage()
    await page.goto(`http://127.0.0.1:${(app.address() as AddressInfo).port}/`)
    const url = `${origin}/events?topic=deployment_status_${deployment}&token=${token(owner)}`
    const answered = page.waitForResponse((response) => response.url() === url, { timeout: WAIT })
    answered.catch(() => {}) // awaited below unless the stream fails first
    await openEventSource(page, url)
    // Without CORS headers the browser fails the stream: an error, CLOSED.
    const opened = await waitForSeen(page, 'ready or an error', (s) => readies(s).length === 1 || s.some((x) => x.kind === 'error'))
    assert.deepEqual(opened.map((s) => s.kind), ['open', 'ready'], `the stream opens: ${JSON.stringify(opened)}`)
    const response = await answered
    assert.notEqual((await response.request().allHeaders()).origin, origin, 'a cross-origin request')
    assert.equal(await response.headerValue('access-control-allow-origin'), '*')
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [deployment, '[INFO] across origins'])
    const all = await waitForSeen(page, 'the log line', (s) => events(s).length === 1)
    assert.deepEqual(all.map((s) => s.kind), ['open', 'ready', 'DEPLOYMENT_LOGS_UPDATE'])
    assert.equal(JSON.parse(all[2].data!).data.logs, '[INFO] across origins')
  } finally {
    await browser.close()
    await sql?.end()
    await server?.stop()
    await new Promise((closed) => app.close(closed))
    await database.drop()
  }
})

test('EventSource at the token’s exp gets token_expired, then its retry with that token is refused: CLOSED', { skip: noChromium, timeout: 120_000 }, async () => {
  const database = await createDatabase()
  let server: Server | null = null
  let sql: pg.Client | null = null
  const browser = await launchChromium()
  try {
    server = await startServer(database)
    const origin = `http://127.0.0.1:${server.port}`
    sql = await connectWriter(database)
    const owner = randomUUID()
    const deployment = await createDeployment(sql, owner)
    const page = await browser.context.newPage()
    await page.goto(`${origin}/healthz`)
    // A token that expires in a few seconds; nothing waits for the clock but the server.
    await openEventSource(page, `${origin}/events?topic=deployment_logs_${deployment}&token=${token(owner, { ttl: 3 })}`)
    await waitForSeen(page, 'ready', (s) => readies(s).length === 1)
    const all = await waitForSeen(page, 'token_expired, then the refused retry', (s) => s.some((x) => x.kind === 'error' && x.readyState === CLOSED))
    assert.deepEqual(
      all.map((s) => (s.kind === 'error' ? `error ${s.readyState}` : s.kind)),
      ['open', 'ready', 'token_expired', 'error 0', `error ${CLOSED}`],
      'the stream ends after token_expired; EventSource retries once (CONNECTING), is refused 401, and stops',
    )
    assert.equal(JSON.parse(all[2].data!).data.code, 'token_expired')
  } finally {
    await browser.close()
    await sql?.end()
    await server?.stop()
    await database.drop()
  }
})

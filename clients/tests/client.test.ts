// WindflowClient against a scripted socket: which topics and `since` each
// reconnect names in its `auth` (resume at connect), and which errors stop
// the retries.
// It is the copy the package ships (`windflow-notify-clients/client`),
// byte for byte the one the server serves (tests/package.test.ts).
import assert from 'node:assert/strict'
import { createServer, type Server } from 'node:http'
import type { Socket } from 'node:net'
import { test } from 'node:test'
import WebSocket from 'ws'
import { WindflowClient } from 'windflow-notify-clients/client'
import { until } from '../support/server.js'

type Sent = { type: string; token?: string; topic?: string; topics?: string[]; since?: number }
/** What a connection's `auth` resumes: its topics and `since`. */
type Resume = { topics?: string[]; since?: number }

/** A WebSocket whose server side the test plays. */
class ScriptedSocket {
  static all: ScriptedSocket[] = []
  readyState = 0
  sent: Sent[] = []
  onopen: (() => void) | null = null
  onmessage: ((event: { data: string }) => void) | null = null
  onclose: ((event: { code: number; reason: string }) => void) | null = null
  onerror: (() => void) | null = null

  constructor(readonly url: string) {
    ScriptedSocket.all.push(this)
  }

  send(text: string) {
    this.sent.push(JSON.parse(text))
  }

  closedWith: number | null = null

  close(code = 1000) {
    this.closedWith = code
    this.drop(code)
  }

  /** The server accepts the connection and authenticates it. */
  accept() {
    this.readyState = 1
    this.onopen?.()
    this.reply({ type: 'authenticated', data: { user_id: 'u', expires_at: '2030-01-01T00:00:00Z' } })
  }

  reply(message: object) {
    this.onmessage?.({ data: JSON.stringify(message) })
  }

  /** The connection is lost (a server restart). */
  drop(code = 1006) {
    this.readyState = 3
    this.onclose?.({ code, reason: '' })
  }

  subscribes(): Sent[] {
    return this.sent.filter((message) => message.type === 'subscribe')
  }

  /** The topics and `since` its `auth` named. */
  resume(): Resume {
    const auth = this.sent.find((message) => message.type === 'auth')
    assert.ok(auth, 'an auth message')
    const resume: Resume = {}
    if (auth.topics !== undefined) resume.topics = auth.topics
    if (auth.since !== undefined) resume.since = auth.since
    return resume
  }
}

const A = '0b1e2a10-0000-4000-8000-00000000000a'
const B = '0b1e2a10-0000-4000-8000-00000000000b'
const logs = (id: string, event_id: number) => ({
  type: 'DEPLOYMENT_LOGS_UPDATE',
  event_id,
  data: { deployment_id: id, logs: 'x', timestamp: '2030-01-01T00:00:00Z', append: true },
})

const progress = (id: string, event_id: number) => ({
  type: 'DEPLOYMENT_PROGRESS',
  event_id,
  data: { deployment_id: id, progress: 1, current_step: null, total_steps: null, timestamp: '2030-01-01T00:00:00Z' },
})
const status = (id: string, event_id: number) => ({
  type: 'DEPLOYMENT_STATUS_CHANGED',
  event_id,
  data: { deployment_id: id, status: 'running', old_status: 'deploying', timestamp: '2030-01-01T00:00:00Z', user_id: 'u', name: 'n', error_message: null },
})

type Options = Partial<ConstructorParameters<typeof WindflowClient>[0]>

/** A client on a fresh scripted socket, already authenticated. */
async function connected(subscribe: (client: WindflowClient) => void, options: Options = {}) {
  ScriptedSocket.all = []
  const client = new WindflowClient({
    url: 'ws://test/ws',
    token: 't',
    WebSocket: ScriptedSocket,
    minDelay: 1,
    maxDelay: 2,
    heartbeat: 0,
    ...options,
  })
  subscribe(client)
  client.connect()
  await until(() => ScriptedSocket.all.length === 1, 'the first socket')
  const socket = ScriptedSocket.all[0]
  socket.accept()
  return { client, socket }
}

/** Drop the connection; returns what the next one resumes, checking it subscribes nothing after. */
async function reconnect(socket: ScriptedSocket): Promise<Resume> {
  const before = ScriptedSocket.all.length
  socket.drop()
  await until(() => ScriptedSocket.all.length === before + 1, 'a reconnect')
  const next = ScriptedSocket.all[before]
  next.accept()
  assert.deepEqual(next.subscribes(), [], 'the topics went in auth: nothing is subscribed after authenticated')
  return next.resume()
}

test('a drop before any event resumes from the event_id of subscribed', async () => {
  const { client, socket } = await connected((c) => c.subscribe(`deployment_logs_${A}`))
  assert.deepEqual(socket.resume(), { topics: [`deployment_logs_${A}`] }, 'live only: no since yet')
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${A}`, event_id: 41 } })
  assert.deepEqual(await reconnect(socket), { topics: [`deployment_logs_${A}`], since: 41 })
  client.close()
})

test('a reconnect resumes every topic from the last event received, in commit order', async () => {
  const { client, socket } = await connected((c) => {
    c.subscribe(`deployment_logs_${A}`)
    c.subscribe(`deployment_logs_${B}`)
  })
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${A}`, event_id: 41 } })
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${B}`, event_id: 41 } })
  socket.reply(logs(A, 44))
  socket.reply(logs(B, 43)) // commit order, not id order: the last seen counts
  socket.reply(logs(A, 42))
  assert.deepEqual(await reconnect(socket), { topics: [`deployment_logs_${A}`, `deployment_logs_${B}`], since: 42 })
  client.close()
})

test('subscribed without event_id leaves the resume point as it was', async () => {
  const { client, socket } = await connected((c) => {
    c.subscribe(`deployment_logs_${A}`, { since: 5 })
    c.subscribe('deployment_events')
  })
  assert.deepEqual(socket.resume(), { topics: [`deployment_logs_${A}`, 'deployment_events'], since: 5 })
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${A}` } })
  socket.reply({ type: 'subscribed', data: { topic: 'deployment_events' } })
  assert.deepEqual(await reconnect(socket), { topics: [`deployment_logs_${A}`, 'deployment_events'], since: 5 })
  client.close()
})

test('a topic given in upper case still takes the lowercase reply and its events', async () => {
  const topic = `deployment_logs_${A.toUpperCase()}`
  const { client, socket } = await connected((c) => c.subscribe(topic))
  socket.reply({ type: 'subscribed', data: { topic: topic.toLowerCase(), event_id: 7 } })
  const first = await reconnect(socket)
  assert.deepEqual(first, { topics: [topic], since: 7 })
  const second = ScriptedSocket.all[1]
  second.reply(logs(A, 8))
  assert.deepEqual(await reconnect(second), { topics: [topic], since: 8 })
  client.close()
})

/** The socket after `socket`, once the client opened it. */
async function nextSocket(before: number): Promise<ScriptedSocket> {
  await until(() => ScriptedSocket.all.length > before, 'a new socket')
  return ScriptedSocket.all[before]
}

/** Let the client's pending promises (a token function's) settle. */
const settle = () => new Promise((done) => setImmediate(done))

test('every event received moves the cursor, whatever carried it (the owner feed too)', async () => {
  const topic = `deployment_status_${A}`
  const { client, socket } = await connected((c) => c.subscribe(topic))
  socket.reply({ type: 'subscribed', data: { topic, event_id: 40 } })
  socket.reply(status(A, 41))
  socket.reply(progress(A, 42)) // not on this topic: the owner feed's
  socket.reply(status(B, 43)) // another deployment
  assert.deepEqual(await reconnect(socket), { topics: [topic], since: 43 })
  client.close()
})

test('a refused token function is asked again, but no socket opens until it gives another token', async () => {
  let token = 'refused'
  let asked = 0
  const { client, socket } = await connected(() => {}, {
    token: () => {
      asked += 1
      return token
    },
  })
  assert.deepEqual(socket.sent[0], { type: 'auth', token: 'refused' })
  socket.reply({ type: 'error', data: { code: 'unauthorized', message: 'bad token' } })
  socket.drop(1008)
  assert.equal(client.state, 'unauthorized')
  assert.equal(client.error?.code, 'unauthorized')
  const before = asked
  await until(() => asked >= before + 5, 'the token function, asked again with backoff')
  assert.equal(ScriptedSocket.all.length, 1, 'no socket for a token the server refused')
  assert.equal(client.state, 'unauthorized')
  token = 'fresh'
  const next = await nextSocket(1)
  next.accept()
  assert.deepEqual(next.sent[0], { type: 'auth', token: 'fresh' })
  assert.equal(client.state, 'open')
  client.close()
})

test('a refused string token waits for setToken, and the same token again opens nothing', async () => {
  const { client, socket } = await connected(() => {}, { token: 'refused' })
  socket.drop(1008)
  assert.equal(client.state, 'unauthorized')
  client.setToken('refused')
  await settle()
  assert.equal(ScriptedSocket.all.length, 1)
  assert.equal(client.state, 'unauthorized')
  client.setToken('fresh')
  const next = await nextSocket(1)
  next.accept()
  assert.deepEqual(next.sent[0], { type: 'auth', token: 'fresh' })
  client.close()
})

test('a forbidden topic is dropped: no reconnect asks for it again', async () => {
  const theirs = `deployment_logs_${A}`
  const mine = `deployment_logs_${B}`
  const errors: Array<{ code: string; topic?: string }> = []
  const { client, socket } = await connected((c) => {
    c.subscribe(theirs, { since: 0 })
    c.subscribe(mine, { since: 0 })
    c.on('error', (error) => errors.push(error))
  })
  assert.deepEqual(socket.resume(), { topics: [theirs, mine], since: 0 })
  socket.reply({ type: 'error', data: { code: 'forbidden', message: 'not yours', topic: theirs } })
  socket.reply({ type: 'subscribed', data: { topic: mine, event_id: 0 } })
  assert.deepEqual(errors, [{ code: 'forbidden', message: 'not yours', topic: theirs }])
  assert.equal(client.error, null, 'a topic error is not the connection’s')
  assert.deepEqual(await reconnect(socket), { topics: [mine], since: 0 })
  client.close()
})

test('unavailable: the same since is asked again, and events meanwhile do not move the cursor', async () => {
  const topic = `deployment_logs_${A}`
  const { client, socket } = await connected((c) => c.subscribe(topic, { since: 5 }))
  assert.deepEqual(socket.resume(), { topics: [topic], since: 5 })
  socket.reply({ type: 'error', data: { code: 'unavailable', message: 'permission check failed', topic } })
  socket.reply(logs(B, 9)) // the owner feed, live, while the topic's events 6..8 are still owed
  await until(() => socket.subscribes().length === 1, 'the subscribe, sent again')
  assert.deepEqual(socket.subscribes()[0], { type: 'subscribe', topic, since: 5 })
  // Dropped before the retry was answered: the resume still starts at 5.
  const again = await reconnect(socket)
  assert.deepEqual(again, { topics: [topic], since: 5 })
  const second = ScriptedSocket.all[1]
  second.reply({ type: 'subscribed', data: { topic, event_id: 5 } })
  second.reply(logs(A, 6))
  assert.deepEqual(await reconnect(second), { topics: [topic], since: 6 })
  client.close()
})

test('after a close that says the server restarts, the next attempt does not wait for the backoff', async () => {
  const topic = `deployment_logs_${A}`
  // A minute of backoff: only the restart schedule can reconnect within the wait.
  const { client, socket } = await connected((c) => c.subscribe(topic, { since: 3 }), { minDelay: 60_000, maxDelay: 60_000 })
  socket.drop(1001)
  const next = await nextSocket(1)
  next.drop(1006) // still restarting: refused
  const third = await nextSocket(2)
  third.accept()
  assert.deepEqual(third.resume(), { topics: [topic], since: 3 })
  client.close()
})

test('reconnect() opens a new socket now and resumes every topic', async () => {
  const topic = `deployment_progress_${A}`
  const { client, socket } = await connected((c) => c.subscribe(topic), { minDelay: 60_000, maxDelay: 60_000 })
  socket.reply({ type: 'subscribed', data: { topic, event_id: 12 } })
  client.reconnect()
  assert.equal(socket.closedWith, 4000)
  const next = await nextSocket(1)
  next.accept()
  assert.deepEqual(next.resume(), { topics: [topic], since: 12 })
  client.close()
})

test('going online ends a backoff wait at once', async () => {
  const window = new EventTarget()
  const global = globalThis as { addEventListener?: unknown; removeEventListener?: unknown }
  global.addEventListener = window.addEventListener.bind(window)
  global.removeEventListener = window.removeEventListener.bind(window)
  try {
    const { client, socket } = await connected(() => {}, { minDelay: 60_000, maxDelay: 60_000 })
    socket.drop(1006)
    assert.equal(client.state, 'reconnecting')
    window.dispatchEvent(new Event('online'))
    ;(await nextSocket(1)).accept()
    assert.equal(client.state, 'open')
    client.close()
  } finally {
    delete global.addEventListener
    delete global.removeEventListener
  }
})

/**
 * An HTTP server that answers every request with `status`; upgrades too,
 * unless `hold` (as Vite's dev server does with a path it does not proxy:
 * the upgrade is never answered).
 */
async function httpServer(answer: (upgrade: boolean) => [number, string], hold = false): Promise<Server> {
  const server = createServer((request, response) => {
    const [status, type] = answer(request.headers.upgrade !== undefined)
    response.writeHead(status, { 'content-type': type }).end('<!doctype html><p>a page</p>')
  })
  const held: Socket[] = []
  if (hold) server.on('upgrade', (_request, socket: Socket) => held.push(socket))
  server.on('close', () => held.forEach((socket) => socket.destroy()))
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done))
  return server
}

async function upgradeRefusal(server: Server) {
  const sockets: Array<{ readyState: number }> = []
  const address = server.address()
  const port = typeof address === 'object' && address ? address.port : 0
  class Counted extends WebSocket {
    constructor(url: string) {
      super(url)
      sockets.push(this)
    }
  }
  const client = new WindflowClient({ url: `ws://127.0.0.1:${port}/ws`, token: 't', WebSocket: Counted, minDelay: 50, maxDelay: 100 })
  const errors: Array<{ code: string; message: string; status?: number }> = []
  client.on('error', (error) => errors.push(error))
  client.connect()
  try {
    await until(() => errors.length > 0, 'an error')
    // The probe closes a socket still held open; give it the turn it takes.
    await new Promise((done) => setImmediate(done))
    return { error: errors[0], state: client.state, firstSocket: sockets[0].readyState }
  } finally {
    client.close()
    server.close()
    server.closeAllConnections()
  }
}

test('an HTTP page instead of a WebSocket upgrade (a dev server fallback) is an error, not a silent retry', async () => {
  const { error, state } = await upgradeRefusal(await httpServer(() => [200, 'text/html; charset=utf-8']))
  assert.equal(error.code, 'upgrade_refused')
  assert.equal(error.status, 200)
  assert.match(error.message, /answered HTTP 200 \(text\/html\) instead of a WebSocket upgrade.*proxy \/ws/)
  assert.equal(state, 'reconnecting', 'it keeps trying: a proxy may be fixed')
})

test('an endpoint that refuses the upgrade says so', async () => {
  const { error } = await upgradeRefusal(await httpServer((upgrade) => (upgrade ? [503, 'application/json'] : [426, 'application/json'])))
  assert.equal(error.code, 'upgrade_refused')
  assert.match(error.message, /refused the WebSocket upgrade/)
})

test('an upgrade a dev server holds open forever is an error too, and that socket is given up', async () => {
  const { error, firstSocket } = await upgradeRefusal(await httpServer(() => [200, 'text/html'], true))
  assert.equal(error.code, 'upgrade_refused')
  assert.match(error.message, /answered HTTP 200 \(text\/html\)/)
  assert.ok(firstSocket >= 2, `the held socket is closing or closed (readyState ${firstSocket})`)
})

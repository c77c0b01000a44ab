// WindflowClient's resume bookkeeping, against a scripted socket: which
// `since` each topic is re-subscribed with after a reconnect.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { WindflowClient } from '../../assets/client.js'
import { until } from '../support/server.js'

type Sent = { type: string; topic?: string; since?: number }

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

  close(code = 1000) {
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
}

const A = '0b1e2a10-0000-4000-8000-00000000000a'
const B = '0b1e2a10-0000-4000-8000-00000000000b'
const logs = (id: string, event_id: number) => ({
  type: 'DEPLOYMENT_LOGS_UPDATE',
  event_id,
  data: { deployment_id: id, logs: 'x', timestamp: '2030-01-01T00:00:00Z', append: true },
})

/** A client on a fresh scripted socket, already authenticated. */
async function connected(subscribe: (client: WindflowClient) => void) {
  ScriptedSocket.all = []
  const client = new WindflowClient({ url: 'ws://test/ws', token: 't', WebSocket: ScriptedSocket, minDelay: 1, maxDelay: 2, heartbeat: 0 })
  subscribe(client)
  client.connect()
  await until(() => ScriptedSocket.all.length === 1, 'the first socket')
  const socket = ScriptedSocket.all[0]
  socket.accept()
  return { client, socket }
}

/** Drop the connection; returns what the next one subscribes with. */
async function reconnect(socket: ScriptedSocket): Promise<Sent[]> {
  const before = ScriptedSocket.all.length
  socket.drop()
  await until(() => ScriptedSocket.all.length === before + 1, 'a reconnect')
  const next = ScriptedSocket.all[before]
  next.accept()
  return next.subscribes()
}

test('a drop before any event resumes from the event_id of subscribed', async () => {
  const { client, socket } = await connected((c) => c.subscribe(`deployment_logs_${A}`))
  assert.deepEqual(socket.subscribes(), [{ type: 'subscribe', topic: `deployment_logs_${A}` }])
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${A}`, event_id: 41 } })
  assert.deepEqual(await reconnect(socket), [{ type: 'subscribe', topic: `deployment_logs_${A}`, since: 41 }])
  client.close()
})

test('each topic resumes from its own last event, after its subscribed', async () => {
  const { client, socket } = await connected((c) => {
    c.subscribe(`deployment_logs_${A}`)
    c.subscribe(`deployment_logs_${B}`)
  })
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${A}`, event_id: 41 } })
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${B}`, event_id: 41 } })
  socket.reply(logs(A, 44))
  socket.reply(logs(B, 43)) // commit order, not id order: the last seen counts
  socket.reply(logs(A, 42))
  assert.deepEqual(await reconnect(socket), [
    { type: 'subscribe', topic: `deployment_logs_${A}`, since: 42 },
    { type: 'subscribe', topic: `deployment_logs_${B}`, since: 43 },
  ])
  client.close()
})

test('subscribed without event_id leaves the resume point as it was', async () => {
  const { client, socket } = await connected((c) => {
    c.subscribe(`deployment_logs_${A}`, { since: 5 })
    c.subscribe('deployment_events')
  })
  socket.reply({ type: 'subscribed', data: { topic: `deployment_logs_${A}` } })
  socket.reply({ type: 'subscribed', data: { topic: 'deployment_events' } })
  assert.deepEqual(await reconnect(socket), [
    { type: 'subscribe', topic: `deployment_logs_${A}`, since: 5 },
    { type: 'subscribe', topic: 'deployment_events' },
  ])
  client.close()
})

test('a topic given in upper case still takes the lowercase reply and its events', async () => {
  const topic = `deployment_logs_${A.toUpperCase()}`
  const { client, socket } = await connected((c) => c.subscribe(topic))
  socket.reply({ type: 'subscribed', data: { topic: topic.toLowerCase(), event_id: 7 } })
  const first = await reconnect(socket)
  assert.deepEqual(first, [{ type: 'subscribe', topic, since: 7 }])
  const second = ScriptedSocket.all[1]
  second.reply(logs(A, 8))
  assert.deepEqual(await reconnect(second), [{ type: 'subscribe', topic, since: 8 }])
  client.close()
})

// windflow-notify browser client: an ES module with no dependencies.
// Served by the server at /client.js; documented in docs/client.md.
//
//   import { WindflowClient } from '/client.js'
//   const client = new WindflowClient({ url: 'ws://127.0.0.1:8000/ws', token })
//   client.on('DEPLOYMENT_STATUS_CHANGED', (data, message) => { ... })
//   client.subscribe('deployment_events', { since: 0 })
//   client.connect()
//
// It authenticates with an `auth` message (the token never appears in a
// URL), re-subscribes after every reconnect with `since` set to the last
// `event_id` of that topic it saw (from an event, or from the `subscribed`
// reply), drops events it already delivered, and backs off exponentially
// with jitter between attempts.

/** @typedef {'connecting' | 'open' | 'reconnecting' | 'unauthorized' | 'closed'} ConnectionState */

/**
 * @typedef {object} ClientOptions
 * @property {string} url WebSocket URL, e.g. `ws://127.0.0.1:8000/ws`.
 * @property {string | (() => string | Promise<string>)} token A JWT, or a function returning a fresh one
 *   (called before every connection, so an expired token can be replaced).
 * @property {any} [WebSocket] WebSocket constructor (default: the global one; pass `ws` in Node).
 * @property {number} [minDelay] First reconnect delay in ms (default 250).
 * @property {number} [maxDelay] Longest reconnect delay in ms (default 15000).
 * @property {number} [heartbeat] Send a `ping` after this many ms of silence, and reconnect after
 *   twice that with no answer (default 25000; 0 disables).
 */

const EVENT_TYPES = ['DEPLOYMENT_STATUS_CHANGED', 'DEPLOYMENT_LOGS_UPDATE', 'DEPLOYMENT_PROGRESS']
/** Event ids remembered to drop duplicates; older ones can no longer arrive twice. */
const SEEN_CAPACITY = 5000
/** The close code after which retrying with the same token cannot help. */
const POLICY_VIOLATION = 1008

/** Does `topic` carry `message`? Mirrors the topic table of docs/protocol.md. */
export function topicCarries(topic, message) {
  topic = topic.toLowerCase()
  if (topic === 'deployment_events') return EVENT_TYPES.includes(message.type)
  const id = message.data && message.data.deployment_id
  if (topic === `deployment_logs_${id}`) return message.type === 'DEPLOYMENT_LOGS_UPDATE'
  if (topic === `deployment_progress_${id}`) return message.type === 'DEPLOYMENT_PROGRESS'
  return false
}

export class WindflowClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || !options.url) throw new Error('WindflowClient: `url` is required')
    this.url = options.url
    this.token = options.token
    this.WebSocket = options.WebSocket || globalThis.WebSocket
    this.minDelay = options.minDelay ?? 250
    this.maxDelay = options.maxDelay ?? 15000
    this.heartbeat = options.heartbeat ?? 25000
    /** @type {ConnectionState} */
    this.state = 'closed'
    /** The user id the server authenticated, once it has. */
    this.userId = null
    /** The last event id delivered, in the order the server sent them. */
    this.lastEventId = null
    /** @type {Map<string, number | null>} topic -> resume point (`since`), null for live only */
    this.topics = new Map()
    this.listeners = new Map()
    this.seen = new Set()
    this.seenOrder = []
    this.socket = null
    this.attempt = 0
    this.retryTimer = null
    this.heartbeatTimer = null
    this.lastHeard = 0
    this.wanted = false
  }

  /**
   * Listen to `type`: an event type (`DEPLOYMENT_PROGRESS`...), `event` (every event),
   * `message` (every server message), `state`, `authenticated`, `subscribed`,
   * `resync`, `error` (server error replies) or `close` (socket closed, with its code).
   * Event callbacks get `(data, message)`; returns a function that removes the callback.
   * @param {string} type
   * @param {(...args: any[]) => void} callback
   * @returns {() => void}
   */
  on(type, callback) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set())
    this.listeners.get(type).add(callback)
    return () => this.listeners.get(type)?.delete(callback)
  }

  /**
   * Subscribe to `topic` now and after every reconnect. `since` replays the
   * events after that event id first (0: all the server's event log holds).
   * @param {string} topic
   * @param {{ since?: number | null }} [options]
   */
  subscribe(topic, { since = null } = {}) {
    const start = since ?? this.topics.get(topic) ?? this.lastEventId
    this.topics.set(topic, start ?? null)
    if (this.state === 'open') this.send(subscribeMessage(topic, since))
  }

  /** @param {string} topic */
  unsubscribe(topic) {
    if (!this.topics.delete(topic)) return
    if (this.state === 'open') this.send({ type: 'unsubscribe', topic })
  }

  /** Open the connection (and keep it open until `close()`). */
  connect() {
    this.wanted = true
    if (this.socket || this.retryTimer) return
    this.open()
  }

  /** Close for good: no reconnect. */
  close() {
    this.wanted = false
    clearTimeout(this.retryTimer)
    this.retryTimer = null
    this.stopHeartbeat()
    const socket = this.socket
    this.socket = null
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null
      try { socket.close(1000) } catch { /* already closing */ }
    }
    this.setState('closed')
  }

  /**
   * Replace the token: re-authenticates now if connected, else on the next connection.
   * @param {ClientOptions['token']} token
   */
  setToken(token) {
    this.token = token
    if (this.state === 'open') this.authenticate()
    else if (this.wanted && this.state === 'unauthorized') this.open()
  }

  // --- internals -------------------------------------------------------------

  async open() {
    this.retryTimer = null
    this.setState(this.attempt === 0 ? 'connecting' : 'reconnecting')
    let socket
    try {
      socket = new this.WebSocket(this.url)
    } catch (error) {
      this.emit('close', { code: 0, reason: String(error) })
      this.retry()
      return
    }
    this.socket = socket
    socket.onopen = () => this.authenticate()
    socket.onmessage = (event) => this.receive(event.data)
    socket.onerror = () => {} // the close event that follows carries what matters
    socket.onclose = (event) => {
      if (this.socket !== socket) return
      this.socket = null
      this.stopHeartbeat()
      this.emit('close', { code: event.code, reason: event.reason })
      if (!this.wanted) return
      // 1008 is a refused or expired token: only a new token helps.
      if (event.code === POLICY_VIOLATION && typeof this.token !== 'function') {
        this.setState('unauthorized')
        return
      }
      this.retry()
    }
  }

  async authenticate() {
    let token
    try {
      token = typeof this.token === 'function' ? await this.token() : this.token
    } catch (error) {
      this.emit('error', { code: 'token_unavailable', message: String(error) })
      this.socket?.close(4000)
      return
    }
    this.send({ type: 'auth', token })
    this.startHeartbeat()
  }

  retry() {
    if (!this.wanted || this.retryTimer) return
    // Exponential backoff with "equal jitter": between half and all of the
    // step, so clients dropped by one restart do not return in one burst.
    const step = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt)
    const delay = step / 2 + Math.random() * (step / 2)
    this.attempt += 1
    this.setState('reconnecting')
    this.retryTimer = setTimeout(() => this.open(), delay)
  }

  receive(raw) {
    this.lastHeard = Date.now()
    let message
    try {
      message = JSON.parse(typeof raw === 'string' ? raw : String(raw))
    } catch {
      return
    }
    if (typeof message.event_id === 'number') {
      if (this.seen.has(message.event_id)) return
      this.remember(message)
    }
    this.emit('message', message)
    switch (message.type) {
      case 'authenticated': {
        const firstTime = this.state !== 'open'
        this.userId = message.data.user_id
        this.attempt = 0
        this.setState('open')
        this.emit('authenticated', message.data)
        // A re-auth on a live connection keeps its subscriptions.
        if (firstTime) for (const [topic, since] of this.topics) this.send(subscribeMessage(topic, since))
        break
      }
      case 'subscribed':
        this.subscribed(message.data)
        this.emit('subscribed', message.data)
        break
      case 'unsubscribed':
      case 'pong':
        this.emit(message.type, message.data)
        break
      case 'resync':
        this.emit('resync', message.data)
        break
      case 'error':
        this.emit('error', message.data)
        break
      default:
        if (typeof message.event_id === 'number') {
          this.emit(message.type, message.data, message)
          this.emit('event', message.data, message)
        }
    }
  }

  remember(message) {
    const id = message.event_id
    this.seen.add(id)
    this.seenOrder.push(id)
    if (this.seenOrder.length > SEEN_CAPACITY) this.seen.delete(this.seenOrder.shift())
    this.lastEventId = id
    // Per topic: each topic's events arrive in its commit order, so its
    // last one is where it resumes, even while another topic replays.
    for (const topic of this.topics.keys()) {
      if (topicCarries(topic, message)) this.topics.set(topic, id)
    }
  }

  /**
   * `subscribed` carries the subscription's resume cursor (`event_id`): until
   * an event of the topic arrives, that is where a reconnect resumes, so a
   * drop right after subscribing loses nothing. A server that sends no
   * `event_id` leaves the resume point as it was.
   */
  subscribed(data) {
    if (!data || typeof data.event_id !== 'number' || typeof data.topic !== 'string') return
    for (const topic of this.topics.keys()) {
      if (topic.toLowerCase() === data.topic) this.topics.set(topic, data.event_id)
    }
  }

  send(value) {
    if (this.socket && this.socket.readyState === 1) this.socket.send(JSON.stringify(value))
  }

  startHeartbeat() {
    this.stopHeartbeat()
    if (!this.heartbeat) return
    this.lastHeard = Date.now()
    this.heartbeatTimer = setInterval(() => {
      const silence = Date.now() - this.lastHeard
      if (silence >= 2 * this.heartbeat) {
        // A half-open connection (laptop sleep, lost Wi-Fi): start over.
        this.socket?.close(4000)
      } else if (silence >= this.heartbeat) {
        this.send({ type: 'ping' })
      }
    }, Math.max(1000, this.heartbeat / 2))
  }

  stopHeartbeat() {
    clearInterval(this.heartbeatTimer)
    this.heartbeatTimer = null
  }

  setState(state) {
    if (this.state === state) return
    this.state = state
    this.emit('state', state)
  }

  emit(type, ...args) {
    for (const callback of this.listeners.get(type) ?? []) {
      try {
        callback(...args)
      } catch (error) {
        console.error(`windflow client: a "${type}" callback threw`, error)
      }
    }
  }
}

function subscribeMessage(topic, since) {
  return since === null || since === undefined ? { type: 'subscribe', topic } : { type: 'subscribe', topic, since }
}

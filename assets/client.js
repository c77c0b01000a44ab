// windflow-notify browser client: an ES module with no dependencies.
// Served by the server at /client.js, and shipped in the npm package
// `windflow-notify-clients` (as `windflow-notify-clients/client`, a
// byte-for-byte copy); documented in docs/client.md.
//
//   import { WindflowClient } from '/client.js'
//   const client = new WindflowClient({ url: 'ws://127.0.0.1:8000/ws', token })
//   client.on('DEPLOYMENT_STATUS_CHANGED', (data, message) => { ... })
//   client.subscribe('deployment_events', { since: 0 })
//   client.connect()
//
// It authenticates with an `auth` message (the token never appears in a
// URL) that resumes at connect: it names every topic and `since`, the last
// `event_id` the connection before saw (from an event, or from a
// `subscribed` reply), so the server sends the owner feed and the topics
// from there, merged in commit order, before anything live. It drops
// events it already delivered, and backs off exponentially with jitter
// between attempts. Errors that retrying cannot fix stop the
// retries: a refused token (until the token changes), a topic refused as
// `forbidden` or `invalid_topic` (that topic only).

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
 * @property {boolean} [dedupe] Drop events already delivered (default true). `false` hands every
 *   event the server sends to the callbacks, for an app that merges events by id itself.
 * @property {number} [connectTimeout] Give up on a handshake not done after this many ms, and try
 *   again (default 10000).
 */

const EVENT_TYPES = ['DEPLOYMENT_STATUS_CHANGED', 'DEPLOYMENT_LOGS_UPDATE', 'DEPLOYMENT_PROGRESS']
/** The per-deployment topics: prefix -> the one event type it carries (docs/protocol.md). */
const TOPIC_TYPES = {
  deployment_status_: 'DEPLOYMENT_STATUS_CHANGED',
  deployment_logs_: 'DEPLOYMENT_LOGS_UPDATE',
  deployment_progress_: 'DEPLOYMENT_PROGRESS',
}
/** Event ids remembered to drop duplicates; older ones can no longer arrive twice. */
const SEEN_CAPACITY = 5000
/** The close code of a refused or expired token: only another token helps. */
const POLICY_VIOLATION = 1008
/** Close codes that say the server is going away and coming back (shutdown, restart). */
const RESTART_CODES = [1001, 1012]
/** While a server restarts, attempts come every 250..750 ms for this long, then back off. */
const RESTART_DELAY = 500
const RESTART_WINDOW = 30000
/**
 * A handshake not done after this long makes the client ask the URL over
 * HTTP: a dev server that does not proxy the path holds the upgrade open
 * forever, and its page fallback answers the plain request at once.
 */
const PROBE_AFTER = 2000
/** Topic errors after which subscribing again cannot succeed: the topic is dropped. */
const REFUSALS = ['forbidden', 'invalid_topic', 'too_many_subscriptions']

/** Does `topic` carry `message`? Mirrors the topic table of docs/protocol.md. */
export function topicCarries(topic, message) {
  topic = topic.toLowerCase()
  if (topic === 'deployment_events') return EVENT_TYPES.includes(message.type)
  const id = message.data && message.data.deployment_id
  for (const [prefix, type] of Object.entries(TOPIC_TYPES)) {
    if (topic === `${prefix}${id}`) return message.type === type
  }
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
    this.dedupe = options.dedupe ?? true
    this.connectTimeout = options.connectTimeout ?? 10000
    /** @type {ConnectionState} */
    this.state = 'closed'
    /** The user id the server authenticated, once it has. */
    this.userId = null
    /** The last event id delivered, in the order the server sent them. */
    this.lastEventId = null
    /**
     * Where the next connection resumes (the `since` of its `auth`): the
     * last `event_id` received, from an event or a `subscribed` reply. A
     * connection carries the owner feed and every topic in commit order,
     * so the last one received is where all of it resumes.
     */
    this.cursor = null
    /** The last error of the connection itself (not of a topic); null once authenticated. */
    this.error = null
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
    // Bumped by close() and reconnect(): an open() that awaited a token
    // meanwhile gives up.
    this.generation = 0
    this.opening = false
    // The token sent on the current connection, and the one the server
    // refused with 1008 (undefined: none): the same token is not tried again.
    this.sentToken = undefined
    this.refusedToken = undefined
    // Until when a close said the server is restarting (fast retries).
    this.restartingUntil = 0
    // Topics answered `unavailable`: their cursor stays the `since` that
    // failed until the retried subscribe is answered, so nothing that
    // arrives meanwhile moves it past the events the replay still owes.
    this.frozen = new Set()
    /** @type {Map<string, { attempt: number, timer: any }>} */
    this.topicRetries = new Map()
    this.handshakeTimers = []
    this.wake = () => this.wakeUp()
    this.onVisibility = () => {
      if (globalThis.document?.visibilityState === 'visible') this.wakeUp()
    }
  }

  /**
   * Listen to `type`: an event type (`DEPLOYMENT_PROGRESS`...), `event` (every event),
   * `message` (every server message), `state`, `authenticated`, `subscribed`, `unsubscribed`,
   * `resync`, `error` (server error replies and the client's own: `token_unavailable`,
   * `upgrade_refused`) or `close` (socket closed, with its code).
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
    this.frozen.delete(topic)
    this.cancelTopicRetry(topic)
    if (this.state === 'open') this.send(subscribeMessage(topic, since))
    // Named in the next connection's `auth`: its `since` must not pass this one.
    else if (since !== null) this.frozen.add(topic)
  }

  /** @param {string} topic */
  unsubscribe(topic) {
    this.frozen.delete(topic)
    this.cancelTopicRetry(topic)
    if (!this.topics.delete(topic)) return
    if (this.state === 'open') this.send({ type: 'unsubscribe', topic })
  }

  /** Open the connection (and keep it open until `close()`). */
  connect() {
    if (!this.wanted) {
      this.wanted = true
      // Back online, or back to the tab: try now rather than at the end of a backoff.
      globalThis.addEventListener?.('online', this.wake)
      globalThis.document?.addEventListener?.('visibilitychange', this.onVisibility)
    }
    if (this.socket || this.retryTimer || this.opening) return
    this.open()
  }

  /** Close for good: no reconnect. */
  close() {
    this.wanted = false
    this.generation += 1
    globalThis.removeEventListener?.('online', this.wake)
    globalThis.document?.removeEventListener?.('visibilitychange', this.onVisibility)
    clearTimeout(this.retryTimer)
    this.retryTimer = null
    this.opening = false
    this.stopHeartbeat()
    for (const topic of [...this.topicRetries.keys()]) this.cancelTopicRetry(topic)
    this.drop(1000)
    this.setState('closed')
  }

  /**
   * Connect again now: drops the current socket (if any), forgets a refused
   * token and the backoff, and resumes every topic from its cursor.
   */
  reconnect() {
    this.refusedToken = undefined
    this.attempt = 0
    this.generation += 1
    clearTimeout(this.retryTimer)
    this.retryTimer = null
    this.opening = false
    this.stopHeartbeat()
    this.drop(4000, 'reconnect')
    if (!this.wanted) return this.connect()
    this.open()
  }

  /**
   * Replace the token: re-authenticates now if connected, else on the next connection.
   * @param {ClientOptions['token']} token
   */
  setToken(token) {
    this.token = token
    if (this.state === 'open') this.authenticate()
    else if (this.wanted && this.state === 'unauthorized') {
      clearTimeout(this.retryTimer)
      this.retryTimer = null
      this.open()
    }
  }

  // --- internals -------------------------------------------------------------

  async open() {
    this.retryTimer = null
    this.opening = true
    const generation = this.generation
    if (this.state !== 'unauthorized') this.setState(this.attempt === 0 ? 'connecting' : 'reconnecting')
    let token
    try {
      token = typeof this.token === 'function' ? await this.token() : this.token
    } catch (error) {
      if (generation !== this.generation) return
      this.opening = false
      this.fail({ code: 'token_unavailable', message: `the token function failed: ${error}` })
      this.retry()
      return
    }
    if (generation !== this.generation) return
    this.opening = false
    if (this.refusedToken !== undefined && token === this.refusedToken) {
      // The server refused this very token: opening a socket cannot help.
      // Ask the token function again later (or on `online`, a visible tab).
      this.setState('unauthorized')
      if (typeof this.token === 'function') this.retry()
      return
    }
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
    this.sentToken = token
    let opened = false
    let probed = false
    const probe = () => {
      if (probed) return
      probed = true
      this.probe(generation)
        .then((refused) => {
          // Whatever answered will not upgrade this socket either.
          if (refused && this.socket === socket && !opened) socket.close()
        })
        .catch(() => {})
    }
    this.handshakeTimers = [
      setTimeout(probe, Math.min(PROBE_AFTER, this.connectTimeout)),
      setTimeout(() => opened || socket.close(), this.connectTimeout),
    ]
    socket.onopen = () => {
      opened = true
      this.stopHandshakeTimers()
      this.send(this.authMessage(token))
      this.startHeartbeat()
    }
    socket.onmessage = (event) => this.receive(event.data)
    socket.onerror = () => {} // the close event that follows carries what matters
    socket.onclose = (event) => {
      if (this.socket !== socket) return
      this.socket = null
      this.stopHeartbeat()
      this.stopHandshakeTimers()
      for (const topic of [...this.topicRetries.keys()]) this.cancelTopicRetry(topic)
      this.emit('close', { code: event.code, reason: event.reason })
      if (!this.wanted) return
      if (event.code === POLICY_VIOLATION) {
        this.refusedToken = this.sentToken
        this.setState('unauthorized')
        // A plain string cannot change by itself: wait for setToken or reconnect.
        if (typeof this.token === 'function') this.retry()
        return
      }
      if (RESTART_CODES.includes(event.code)) this.restartingUntil = Date.now() + RESTART_WINDOW
      if (!opened) probe()
      this.retry()
    }
  }

  /**
   * The first message of a connection: resume at connect. It names every
   * topic and one `since`: where the last connection left off, or earlier
   * for a topic whose own cursor is behind it (a replay that failed, a
   * `since` asked for while disconnected). Nothing is sent after
   * `authenticated`: the server answers each topic, then sends what the
   * owner feed and the topics owe after `since`, then live.
   */
  authMessage(token) {
    const message = { type: 'auth', token }
    const topics = [...this.topics.keys()]
    if (topics.length > 0) message.topics = topics
    const since = this.resumeSince()
    if (since !== null) message.since = since
    // This connection starts there: a drop before anything arrives resumes there again.
    this.cursor = since
    return message
  }

  /** The `since` a new connection resumes from, null for live only. */
  resumeSince() {
    let since = this.cursor
    for (const topic of this.frozen) {
      const own = this.topics.get(topic)
      if (typeof own === 'number' && (since === null || own < since)) since = own
    }
    return since
  }

  async authenticate() {
    let token
    try {
      token = typeof this.token === 'function' ? await this.token() : this.token
    } catch (error) {
      this.fail({ code: 'token_unavailable', message: `the token function failed: ${error}` })
      return
    }
    this.sentToken = token
    this.send({ type: 'auth', token })
  }

  /**
   * A socket that closed before it opened, or is slow to: the server may
   * be down, or an HTTP server answered that is not windflow-notify (a dev
   * server's page fallback, a proxy that does not forward upgrades).
   * Browsers hide the answer from WebSocket, so ask with a plain GET: an
   * answer means the upgrade was refused, which retrying alone will not
   * fix. Resolves true when it reported `upgrade_refused`.
   */
  async probe(generation) {
    if (typeof globalThis.fetch !== 'function') return false
    const url = this.url.replace(/^ws/i, 'http')
    const location = globalThis.location
    let sameOrigin = !location
    try {
      sameOrigin = sameOrigin || new URL(url).origin === location.origin
    } catch {
      return false
    }
    let response
    try {
      // Cross-origin, only whether something answered can be known.
      response = await fetch(url, sameOrigin ? { cache: 'no-store' } : { cache: 'no-store', mode: 'no-cors' })
    } catch {
      return false // nothing answered: the server is down, retrying is right
    }
    response.body?.cancel?.().catch?.(() => {})
    if (generation !== this.generation || this.state === 'open') return false
    const status = response.status
    // 5xx: the server, or a proxy in front of it, is down or full: retrying is right.
    if (status >= 500) return false
    const type = response.headers.get('content-type')?.split(';')[0]
    let message
    if (status === 426) {
      message = `${this.url} refused the WebSocket upgrade (windflow-notify answers 401 to a bad token in the URL, 429 past the connections per user); retrying`
    } else {
      const answer = status ? `HTTP ${status}${type ? ` (${type})` : ''}` : 'an HTTP answer'
      message = `${this.url} answered ${answer} instead of a WebSocket upgrade: is it the windflow-notify endpoint? Behind a dev server, proxy /ws to it (docs/client.md); retrying`
    }
    this.fail({ code: 'upgrade_refused', message, status })
    return true
  }

  retry() {
    if (!this.wanted || this.retryTimer) return
    let delay
    if (Date.now() < this.restartingUntil) {
      // A restarting server answers again within seconds: try often, so
      // the page catches up promptly, spread so clients do not come in one burst.
      delay = RESTART_DELAY / 2 + Math.random() * RESTART_DELAY
    } else {
      // Exponential backoff with "equal jitter": between half and all of the
      // step, so clients dropped by one restart do not return in one burst.
      const step = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt)
      delay = step / 2 + Math.random() * (step / 2)
      this.attempt += 1
    }
    if (this.state !== 'unauthorized') this.setState('reconnecting')
    this.retryTimer = setTimeout(() => this.open(), delay)
  }

  /** `online`, or the tab shown again: do now what a backoff timer waits for. */
  wakeUp() {
    if (!this.wanted) return
    if (this.state === 'open') {
      this.send({ type: 'ping' }) // a socket that died while the laptop slept shows itself sooner
      return
    }
    if (!this.retryTimer) return
    clearTimeout(this.retryTimer)
    this.attempt = 0
    this.open()
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
      if (this.dedupe && this.seen.has(message.event_id)) return
      this.remember(message)
    }
    this.emit('message', message)
    switch (message.type) {
      case 'authenticated': {
        this.userId = message.data.user_id
        this.attempt = 0
        this.restartingUntil = 0
        this.refusedToken = undefined
        this.error = null
        this.setState('open')
        // The topics and `since` went in `auth`: their answers follow by themselves.
        this.emit('authenticated', message.data)
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
        this.topicError(message.data)
        if (message.data && !message.data.topic) this.error = message.data
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
    if (this.dedupe) {
      this.seen.add(id)
      this.seenOrder.push(id)
      if (this.seenOrder.length > SEEN_CAPACITY) this.seen.delete(this.seenOrder.shift())
    }
    this.lastEventId = id
    this.cursor = id
    // Per topic: each topic's events arrive in its commit order, so its
    // last one is where it resumes, even while another topic replays.
    for (const topic of this.topics.keys()) {
      if (!this.frozen.has(topic) && topicCarries(topic, message)) this.topics.set(topic, id)
    }
  }

  /** The subscribed topic a reply names (replies name topics in lowercase). */
  topicNamed(name) {
    if (typeof name !== 'string') return undefined
    for (const topic of this.topics.keys()) if (topic.toLowerCase() === name) return topic
    return undefined
  }

  /**
   * `subscribed` carries the subscription's resume cursor (`event_id`): until
   * an event of the topic arrives, that is where a reconnect resumes, so a
   * drop right after subscribing loses nothing. A server that sends no
   * `event_id` leaves the resume point as it was.
   */
  subscribed(data) {
    if (typeof data?.event_id === 'number') this.cursor = data.event_id
    const topic = this.topicNamed(data?.topic)
    if (topic === undefined) return
    this.frozen.delete(topic)
    this.cancelTopicRetry(topic)
    if (typeof data.event_id === 'number') this.topics.set(topic, data.event_id)
  }

  /**
   * An error about one topic. `unavailable`: the server could not serve the
   * subscribe now; it is sent again with the same `since`, with backoff.
   * A refusal: the topic is dropped, so no reconnect asks again.
   */
  topicError(data) {
    const topic = this.topicNamed(data?.topic)
    if (topic === undefined) return
    if (REFUSALS.includes(data.code)) {
      this.topics.delete(topic)
      this.frozen.delete(topic)
      this.cancelTopicRetry(topic)
    } else if (data.code === 'unavailable') {
      this.frozen.add(topic)
      const retry = this.topicRetries.get(topic) ?? { attempt: 0, timer: null }
      clearTimeout(retry.timer)
      const step = Math.min(this.maxDelay, this.minDelay * 2 ** retry.attempt)
      retry.attempt += 1
      retry.timer = setTimeout(() => {
        retry.timer = null
        if (this.topics.has(topic)) this.send(subscribeMessage(topic, this.topics.get(topic)))
      }, step / 2 + Math.random() * (step / 2))
      this.topicRetries.set(topic, retry)
    }
  }

  cancelTopicRetry(topic) {
    const retry = this.topicRetries.get(topic)
    if (!retry) return
    clearTimeout(retry.timer)
    this.topicRetries.delete(topic)
  }

  /** A connection-level error of the client's own (the server's come as `error` replies). */
  fail(error) {
    this.error = error
    this.emit('error', error)
  }

  /** Forget the current socket and close it, without the reconnect its close would start. */
  drop(code, reason) {
    this.stopHandshakeTimers()
    const socket = this.socket
    this.socket = null
    if (!socket) return
    socket.onopen = socket.onmessage = socket.onclose = null
    // Not null: closing a socket that is still connecting is reported as an
    // error, which Node's `ws` throws when nothing listens.
    socket.onerror = () => {}
    try {
      socket.close(code, reason)
    } catch {
      // already closing
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

  stopHandshakeTimers() {
    for (const timer of this.handshakeTimers) clearTimeout(timer)
    this.handshakeTimers = []
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

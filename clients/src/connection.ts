// One connection shared by every view of a page: the client, and what it
// received of each deployment. Views attach a deployment (its three topics
// are subscribed while one view follows it) and read its reactive fields.
//
// Why it keeps deployments nobody shows: every connection of an owner
// receives all events of the owner's deployments, and the server never
// sends one connection an event twice, so a view mounted later would miss
// what arrived before it. Kept here, merged with the replay by event id.
import { markRaw, shallowReactive } from 'vue'
import { WindflowClient } from './client.js'
import { DEFAULT_LIMITS, Deployment, deploymentOfTopic, isRefusal, topicsOf, type LogLimits } from './deployment.js'
import type { DeploymentEvent, Resync, Subscribed, Topic } from './messages.js'
import type { ConnectionError, ConnectionState, InitialState, ViewError, Windflow, WindflowOptions } from './types.js'

const KEEP_DEPLOYMENTS = 100
const IDLE_TIMEOUT = 3000

/** What `app.use(createWindflow(...))` provides. */
export const WINDFLOW = Symbol('windflow-notify')

export interface Attach {
  since: number | null
  initial?: InitialState
  onResync?: (topic: Topic) => void
}

export class Connection {
  client: WindflowClient | null = null
  /** Reactive: what views read of the connection. */
  readonly status: { state: ConnectionState; error: ConnectionError | null } = shallowReactive({
    state: 'closed' as ConnectionState,
    error: null as ConnectionError | null,
  })
  /** In order of their last event or attach: the first ones are forgotten first. */
  private readonly deployments = new Map<string, Deployment>()
  /** Forgotten while this socket received their events: a view of one needs a fresh socket. */
  private readonly forgotten = new Set<string>()
  private readonly limits: LogLimits
  private views = 0
  private followed = 0
  private idleTimer: ReturnType<typeof setTimeout> | undefined

  constructor(
    readonly options: WindflowOptions,
    /** Told when the socket is opened and closed (the shared connections' registry). */
    private readonly registry?: { opened(): void; closed(): void },
  ) {
    this.limits = {
      maxLogEntries: options.maxLogEntries ?? DEFAULT_LIMITS.maxLogEntries,
      maxLogChars: options.maxLogChars ?? DEFAULT_LIMITS.maxLogChars,
    }
  }

  /** Whether this connection may open a socket here: in a browser, or given a WebSocket. */
  canOpen(): boolean {
    return this.options.WebSocket !== undefined || (typeof document !== 'undefined' && 'WebSocket' in globalThis)
  }

  attach(id: string, { since, initial, onResync }: Attach): Deployment {
    clearTimeout(this.idleTimer)
    this.views += 1
    const client = this.open()
    if (this.forgotten.has(id)) {
      this.forgotten.clear()
      client.reconnect()
    }
    const deployment = this.deployments.get(id) ?? this.remember(id, false)
    deployment.applyInitial(initial)
    if (onResync) deployment.resyncListeners.add(onResync)
    deployment.views += 1
    if (deployment.views === 1) {
      this.followed += 1
      this.forgetOld()
      if (isRefusal(deployment.fields.error)) deployment.fields.error = null
      deployment.since = since
      for (const topic of topicsOf(id)) client.subscribe(topic, { since })
    }
    return deployment
  }

  detach(deployment: Deployment, onResync?: (topic: Topic) => void): void {
    if (onResync) deployment.resyncListeners.delete(onResync)
    deployment.views -= 1
    if (deployment.views === 0) {
      this.followed -= 1
      for (const topic of topicsOf(deployment.id)) this.client?.unsubscribe(topic)
      this.forgetOld()
    }
    this.views -= 1
    if (this.views === 0) {
      // A view replaced by another (a route change) unmounts first: wait a
      // moment before closing, so the next view reuses the socket.
      this.idleTimer = setTimeout(() => this.close(), this.options.idleTimeout ?? IDLE_TIMEOUT)
    }
  }

  /** Follow a refused deployment again, and reconnect now. */
  retry(deployment: Deployment): void {
    if (isRefusal(deployment.fields.error)) {
      deployment.fields.error = null
      for (const topic of topicsOf(deployment.id)) this.client?.subscribe(topic, { since: deployment.since })
    }
    this.reconnect()
  }

  reconnect(): void {
    this.client?.reconnect()
  }

  close(): void {
    clearTimeout(this.idleTimer)
    this.client?.close()
    this.client = null
    this.forgotten.clear()
    this.status.state = 'closed'
    this.registry?.closed()
  }

  private open(): WindflowClient {
    if (this.client) return this.client
    const { token, WebSocket, minDelay, maxDelay, heartbeat, connectTimeout } = this.options
    // No de-duplication in the client: each deployment merges its events by
    // id, and a replay on a new socket must reach a deployment forgotten
    // since the old socket delivered its events.
    const url = this.options.url ?? defaultUrl()
    const options = { url, token, WebSocket, minDelay, maxDelay, heartbeat, connectTimeout, dedupe: false }
    const client = new WindflowClient(options)
    client.on('state', (state: ConnectionState) => {
      this.status.state = state
    })
    client.on('authenticated', () => {
      this.status.error = null
    })
    // A new socket received nothing yet: a replay on it brings back what
    // the old one received and this connection forgot.
    client.on('close', () => this.forgotten.clear())
    client.on('error', (error: ConnectionError) => {
      if (!error.topic) this.status.error = error
      const id = error.topic ? deploymentOfTopic(error.topic) : null
      if (id !== null) this.deployments.get(id)?.refused(error as ViewError)
    })
    client.on('subscribed', (data: Subscribed['data']) => {
      const id = deploymentOfTopic(data.topic)
      if (id !== null) this.deployments.get(id)?.answered()
    })
    client.on('resync', (data: Resync['data']) => {
      const id = deploymentOfTopic(data.topic)
      if (id !== null) this.deployments.get(id)?.resynced(data.topic)
    })
    client.on('event', (_data: unknown, message: DeploymentEvent) => this.receive(message))
    this.client = client
    this.registry?.opened()
    // Views that outlived a close() (of the app's connection) follow on.
    for (const deployment of this.deployments.values()) {
      if (deployment.views > 0) for (const topic of topicsOf(deployment.id)) client.subscribe(topic, { since: deployment.since })
    }
    client.connect()
    return client
  }

  private receive(message: DeploymentEvent): void {
    const id = message.data.deployment_id
    let deployment = this.deployments.get(id)
    if (deployment) {
      this.deployments.delete(id)
      this.deployments.set(id, deployment)
    } else {
      deployment = this.remember(id)
    }
    switch (message.type) {
      case 'DEPLOYMENT_STATUS_CHANGED':
        return deployment.applyStatus(message.event_id, message.data)
      case 'DEPLOYMENT_PROGRESS':
        return deployment.applyProgress(message.event_id, message.data)
      case 'DEPLOYMENT_LOGS_UPDATE':
        return deployment.applyLogs(message.event_id, message.data)
    }
  }

  private remember(id: string, forget = true): Deployment {
    const deployment = new Deployment(id, shallowReactive, this.limits)
    this.deployments.set(id, deployment)
    if (forget) this.forgetOld()
    return deployment
  }

  /** Keep `keepDeployments` deployments that no view follows, the most recent ones. */
  private forgetOld(): void {
    const keep = this.options.keepDeployments ?? KEEP_DEPLOYMENTS
    let excess = this.deployments.size - this.followed - keep
    for (const [id, deployment] of this.deployments) {
      if (excess <= 0) break
      if (deployment.views > 0) continue
      this.deployments.delete(id)
      if (this.client) this.forgotten.add(id)
      excess -= 1
    }
  }
}

function defaultUrl(): string {
  const location = (globalThis as { location?: Location }).location
  if (!location) throw new Error('windflow-notify: pass `url` outside a browser')
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`
}

/** The connection behind each `Windflow`, for `options.windflow`. */
const connections = new WeakMap<Windflow, Connection>()

export function connectionOf(windflow: Windflow): Connection | undefined {
  return connections.get(windflow)
}

/** `app.use(createWindflow({ token }))`: one connection for the app's views, opened when the first one needs it. */
export function createWindflow(options: WindflowOptions): Windflow {
  const connection = new Connection(options)
  const windflow: Windflow = markRaw({
    install(app) {
      app.provide(WINDFLOW, windflow)
      app.onUnmount?.(() => connection.close())
    },
    get state() {
      return connection.status.state
    },
    get error() {
      return connection.status.error
    },
    get client() {
      return connection.client
    },
    reconnect: () => connection.reconnect(),
    close: () => connection.close(),
  })
  connections.set(windflow, connection)
  return windflow
}

/**
 * Views given a `token` of their own share a connection per URL and token
 * (the same string, or the same function): define the token function once,
 * not inline in each view, or use `createWindflow`.
 */
const shared = new Map<string, Map<WindflowOptions['token'], Connection>>()

export function sharedConnection(options: WindflowOptions): Connection {
  const url = options.url ?? ''
  const found = shared.get(url)?.get(options.token)
  if (found) return found
  const connection: Connection = new Connection(options, {
    opened() {
      const byToken = shared.get(url) ?? new Map()
      shared.set(url, byToken)
      if (!byToken.has(options.token)) byToken.set(options.token, connection)
    },
    closed() {
      const byToken = shared.get(url)
      if (byToken?.get(options.token) !== connection) return
      byToken.delete(options.token)
      if (byToken.size === 0) shared.delete(url)
    },
  })
  return connection
}

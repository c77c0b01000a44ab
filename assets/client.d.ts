// Types for client.js (the browser client served at /client.js, and
// shipped in the npm package as `windflow-notify-clients/client`), so
// TypeScript projects that import it type-check under `strict` without
// `allowJs`. Documented in docs/client.md.

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'unauthorized' | 'closed'

export interface ClientOptions {
  /** WebSocket URL, e.g. `ws://127.0.0.1:8000/ws`. */
  url: string
  /** A JWT, or a function returning a fresh one (called before every connection). */
  token: string | (() => string | Promise<string>)
  /** WebSocket constructor (default: the global one; pass `ws` in Node). */
  WebSocket?: unknown
  /** First reconnect delay in ms (default 250). */
  minDelay?: number
  /** Longest reconnect delay in ms (default 15000). */
  maxDelay?: number
  /** Ping after this many ms of silence, reconnect after twice that (default 25000; 0 disables). */
  heartbeat?: number
  /** Drop events already delivered (default true); `false` for an app that merges events by id itself. */
  dedupe?: boolean
  /** Give up on a handshake not done after this many ms, and try again (default 10000). */
  connectTimeout?: number
}

/**
 * An error of the connection: the server's `error` replies without a
 * topic (`unauthorized`, `token_expired`, ...), and the client's own:
 * `token_unavailable` (the token function threw) and `upgrade_refused`
 * (an HTTP server answered, but not with a WebSocket upgrade; `status` is
 * its HTTP status where the browser lets it be read, else 0).
 */
export interface ConnectionError {
  code: string
  message: string
  topic?: string
  status?: number
}

/** Does `topic` carry `message`? */
export function topicCarries(topic: string, message: { type: string; data?: { deployment_id?: string } }): boolean

export class WindflowClient {
  constructor(options: ClientOptions)
  readonly url: string
  state: ConnectionState
  /** The user id the server authenticated, once it has. */
  userId: string | null
  /** The last event id delivered, in the order the server sent them. */
  lastEventId: number | null
  /** Where the next connection resumes (the `since` its `auth` names); null for live only. */
  cursor: number | null
  /** The last error of the connection itself; null once authenticated. */
  error: ConnectionError | null
  /** topic -> where it resumes (`since`); null for live only. */
  topics: Map<string, number | null>
  /** Returns a function that removes the callback. */
  on(type: string, callback: (...args: any[]) => void): () => void
  subscribe(topic: string, options?: { since?: number | null }): void
  unsubscribe(topic: string): void
  connect(): void
  close(): void
  /** Connect again now, forgetting a refused token and the backoff. */
  reconnect(): void
  setToken(token: ClientOptions['token']): void
}

// The wire messages, server to client and client to server (docs/protocol.md).
// Field names, value sets and nullability are the protocol's, exactly.

/** `deployments.status`; the database rejects anything else. */
export type DeploymentStatus = 'pending' | 'deploying' | 'running' | 'failed' | 'stopped' | 'rolling_back'

/** RFC 3339 in UTC, ending in `Z`, e.g. `2024-11-28T22:30:00.123456Z`. */
export type Timestamp = string
/** A lowercase hyphenated UUID. */
export type Uuid = string

export interface DeploymentStatusChangedData {
  deployment_id: Uuid
  status: DeploymentStatus
  /** `null` when the deployment was just inserted. */
  old_status: DeploymentStatus | null
  timestamp: Timestamp
  user_id: Uuid
  name: string
  error_message: string | null
}

export interface DeploymentLogsUpdateData {
  deployment_id: Uuid
  /** One `deployment_logs.message`, delivered intact (up to at least 1 MiB). */
  logs: string
  timestamp: Timestamp
  append: boolean
}

export interface DeploymentProgressData {
  deployment_id: Uuid
  /** 0..100; the row's value after the update. */
  progress: number
  current_step: string | null
  total_steps: number | null
  timestamp: Timestamp
}

interface Event<T extends string, D> {
  type: T
  /** The event log id; resume with `since` = the last one seen. */
  event_id: number
  data: D
}

export type DeploymentStatusChanged = Event<'DEPLOYMENT_STATUS_CHANGED', DeploymentStatusChangedData>
export type DeploymentLogsUpdate = Event<'DEPLOYMENT_LOGS_UPDATE', DeploymentLogsUpdateData>
export type DeploymentProgress = Event<'DEPLOYMENT_PROGRESS', DeploymentProgressData>
export type DeploymentEvent = DeploymentStatusChanged | DeploymentLogsUpdate | DeploymentProgress

export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'invalid_topic'
  | 'forbidden'
  | 'too_many_subscriptions'
  | 'token_expired'
  /** The server could not serve a subscribe now (a permission check or a replay failed): subscribe again with the same `since`. */
  | 'unavailable'

export interface Authenticated { type: 'authenticated'; data: { user_id: Uuid; expires_at: Timestamp } }
/**
 * `event_id` is the subscription's resume cursor: subscribe again with
 * `since` = it (or the `event_id` of a later event of the topic) and nothing
 * is lost. Servers before it was added leave it out.
 */
export interface Subscribed { type: 'subscribed'; data: { topic: Topic; event_id?: number } }
export interface Unsubscribed { type: 'unsubscribed'; data: { topic: Topic } }
export interface Pong { type: 'pong'; data: { timestamp: Timestamp } }
/** Events after your `since` were pruned: what the log still holds follows. */
export interface Resync { type: 'resync'; data: { topic: Topic } }
export interface ErrorReply { type: 'error'; data: { code: ErrorCode; message: string; topic?: Topic } }

export type Reply = Authenticated | Subscribed | Unsubscribed | Pong | Resync | ErrorReply
export type ServerMessage = DeploymentEvent | Reply

export type Topic =
  | 'deployment_events'
  | `deployment_status_${string}`
  | `deployment_logs_${string}`
  | `deployment_progress_${string}`

export type ClientMessage =
  | { type: 'auth'; token: string }
  | { type: 'subscribe'; topic: Topic; since?: number }
  | { type: 'unsubscribe'; topic: Topic }
  | { type: 'ping' }

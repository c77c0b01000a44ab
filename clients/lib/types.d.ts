import type { ConnectionError, ConnectionState, WindflowClient } from './client.js';
import type { DeploymentStatus, ErrorCode, Timestamp, Topic } from './messages.js';
export type { ConnectionError, ConnectionState } from './client.js';
/** A value, a ref of it (anything with `.value`), or a getter: what Vue calls `MaybeRefOrGetter`. */
export type MaybeRefOrGetter<T> = T | {
    readonly value: T;
} | (() => T);
/** One log line of a deployment: one `deployment_logs` row, however many lines its message holds. */
export interface LogEntry {
    /** The event's id; `null` for a line given in `initial` without one (shown until the first log event). */
    readonly event_id: number | null;
    readonly message: string;
    readonly timestamp: Timestamp;
}
/** What a view of a deployment says about it: the connection's state, or `forbidden`. */
export type DeploymentViewState = ConnectionState | 'forbidden';
/**
 * Why a view shows nothing, or nothing new: a refusal of one of its topics
 * (`forbidden`, `invalid_topic`, `too_many_subscriptions`: final),
 * `unavailable` (retried with backoff), or an error of its connection
 * (`unauthorized`, `token_expired`, `token_unavailable`, `upgrade_refused`).
 */
export interface ViewError {
    code: ErrorCode | 'token_unavailable' | 'upgrade_refused' | (string & {});
    message: string;
    topic?: Topic;
    /** For `upgrade_refused`: the HTTP status that answered, where the browser shows it (else 0). */
    status?: number;
}
/** Values known before events arrive (e.g. from WindFlow's REST API, or a view shown earlier). */
export interface InitialState {
    name?: string | null;
    status?: DeploymentStatus | null;
    errorMessage?: string | null;
    progress?: number;
    currentStep?: string | null;
    totalSteps?: number | null;
    /**
     * Log lines known already. Lines with an `event_id` (a view's `logs`,
     * kept from before) are merged with the replay by id, so none shows
     * twice. Lines without one (from the REST API) are shown until the
     * first log event arrives; the replay (`since: 0`) then brings them back
     * with their ids.
     */
    logs?: ReadonlyArray<{
        event_id?: number | null;
        message: string;
        timestamp: Timestamp;
    }>;
}
/** How to reach the server; one connection per `createWindflow`, or per `url` and `token`. */
export interface WindflowOptions {
    /** WebSocket URL; default `/ws` on the page's own host (`wss:` on an `https:` page). */
    url?: string;
    /** A JWT, or a function returning a fresh one (called before each connection). */
    token: string | (() => string | Promise<string>);
    /** WebSocket constructor; default the global one (pass `ws` in Node). */
    WebSocket?: unknown;
    /** Log entries kept per deployment (default 2000); the oldest go first. */
    maxLogEntries?: number;
    /** Characters of log messages kept per deployment (default 2,000,000); the newest entry always stays. */
    maxLogChars?: number;
    /**
     * Deployments remembered while no view shows them (default 100). A
     * connection receives every event of the user's own deployments, and the
     * server never sends one connection an event twice: what it received is
     * kept here, so a view mounted later starts complete.
     */
    keepDeployments?: number;
    /** How long a connection stays open once no view uses it, in ms (default 3000). */
    idleTimeout?: number;
    /** Reconnect backoff, in ms: first delay (default 250) and longest (default 15000). */
    minDelay?: number;
    maxDelay?: number;
    /** Ping after this many ms of silence, reconnect after twice that (default 25000; 0 disables). */
    heartbeat?: number;
    /** Give up on a handshake not done after this many ms, and try again (default 10000). */
    connectTimeout?: number;
}
export interface DeploymentWebSocketOptions extends Partial<WindflowOptions> {
    /**
     * Replay from this event id when a view starts following a deployment
     * (default 0: everything the server's event log still holds about it, so
     * `logs` starts complete). `null`: live events only.
     */
    since?: number | null;
    /** Values shown until events say otherwise (for the first deployment the view follows). */
    initial?: InitialState;
    /**
     * The server pruned events after the resume point of `topic` (retention):
     * what the view shows may miss some. Reload from WindFlow's API here.
     */
    onResync?: (topic: Topic) => void;
    /** The connection to use; default the one `app.use(createWindflow(...))` provides, or one per `url` and `token`. */
    windflow?: Windflow;
}
/** A view of one deployment: a read-only reactive object, updated as events arrive. */
export interface DeploymentWebSocket {
    /** The deployment followed (lowercase), `''` for none. */
    readonly deploymentId: string;
    readonly name: string | null;
    /** `null` until known. */
    readonly status: DeploymentStatus | null;
    /** `error_message` of the latest status change (set when `failed`). */
    readonly errorMessage: string | null;
    /** 0..100. */
    readonly progress: number;
    readonly currentStep: string | null;
    readonly totalSteps: number | null;
    /** Every log line of the deployment, in commit order, each once. */
    readonly logs: readonly LogEntry[];
    /** Older entries were dropped to keep `maxLogEntries` / `maxLogChars`. */
    readonly logsTruncated: boolean;
    /** How many times the server said `resync` for this deployment's topics (see `onResync`). */
    readonly resyncs: number;
    /** Authenticated, subscribed and receiving. */
    readonly connected: boolean;
    readonly state: DeploymentViewState;
    /** Why the view is not (or no longer) `connected`; `null` when nothing is wrong. */
    readonly error: ViewError | null;
    /** Connect again now (after a refusal too): skips the backoff. */
    reconnect(): void;
    /** Stop following (also done when the component's scope is disposed). */
    close(): void;
}
/** What `app.use()` takes: the app's shared connection, opened when the first view needs it. */
export interface Windflow {
    install(app: {
        provide(key: symbol, value: unknown): unknown;
        onUnmount?(callback: () => void): void;
    }): void;
    /** The connection's state (`closed` while no view uses it, and outside a browser). */
    readonly state: ConnectionState;
    readonly error: ConnectionError | null;
    /** The client under the views (`null` while closed): for topics of your own. */
    readonly client: WindflowClient | null;
    reconnect(): void;
    close(): void;
}
export type UseDeploymentWebSocket = (deploymentId: MaybeRefOrGetter<string | null | undefined>, options?: DeploymentWebSocketOptions) => DeploymentWebSocket;
export type CreateWindflow = (options: WindflowOptions) => Windflow;

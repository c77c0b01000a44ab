import { WindflowClient } from './client.js';
import { Deployment } from './deployment.js';
import type { Topic } from './messages.js';
import type { ConnectionError, ConnectionState, InitialState, Windflow, WindflowOptions } from './types.js';
/** What `app.use(createWindflow(...))` provides. */
export declare const WINDFLOW: unique symbol;
export interface Attach {
    since: number | null;
    initial?: InitialState;
    onResync?: (topic: Topic) => void;
}
export declare class Connection {
    readonly options: WindflowOptions;
    /** Told when the socket is opened and closed (the shared connections' registry). */
    private readonly registry?;
    client: WindflowClient | null;
    /** Reactive: what views read of the connection. */
    readonly status: {
        state: ConnectionState;
        error: ConnectionError | null;
    };
    /** In order of their last event or attach: the first ones are forgotten first. */
    private readonly deployments;
    /** Forgotten while this socket received their events: a view of one needs a fresh socket. */
    private readonly forgotten;
    private readonly limits;
    private views;
    private followed;
    private idleTimer;
    constructor(options: WindflowOptions, 
    /** Told when the socket is opened and closed (the shared connections' registry). */
    registry?: {
        opened(): void;
        closed(): void;
    } | undefined);
    /** Whether this connection may open a socket here: in a browser, or given a WebSocket. */
    canOpen(): boolean;
    attach(id: string, { since, initial, onResync }: Attach): Deployment;
    detach(deployment: Deployment, onResync?: (topic: Topic) => void): void;
    /** Follow a refused deployment again, and reconnect now. */
    retry(deployment: Deployment): void;
    reconnect(): void;
    close(): void;
    private open;
    private receive;
    private remember;
    /** Keep `keepDeployments` deployments that no view follows, the most recent ones. */
    private forgetOld;
}
export declare function connectionOf(windflow: Windflow): Connection | undefined;
/** `app.use(createWindflow({ token }))`: one connection for the app's views, opened when the first one needs it. */
export declare function createWindflow(options: WindflowOptions): Windflow;
export declare function sharedConnection(options: WindflowOptions): Connection;

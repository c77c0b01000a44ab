import type { DeploymentLogsUpdateData, DeploymentProgressData, DeploymentStatusChangedData, Topic } from './messages.js';
import type { DeploymentWebSocket, InitialState, LogEntry, ViewError } from './types.js';
/** The reactive part: what views read. */
export interface DeploymentFields {
    name: string | null;
    status: DeploymentWebSocket['status'];
    errorMessage: string | null;
    progress: number;
    currentStep: string | null;
    totalSteps: number | null;
    logs: LogEntry[];
    logsTruncated: boolean;
    resyncs: number;
    /** A refusal (final) or `unavailable` (until its retry is answered). */
    error: ViewError | null;
}
export interface LogLimits {
    maxLogEntries: number;
    maxLogChars: number;
}
export declare const DEFAULT_LIMITS: LogLimits;
export declare function topicsOf(id: string): Topic[];
/** The deployment a per-deployment topic names, lowercase; `null` for any other topic. */
export declare function deploymentOfTopic(topic: string): string | null;
export declare function isRefusal(error: ViewError | null): boolean;
/** `toValue` without `vue`: a getter is called, a ref is read. */
export declare function readId(source: unknown): string;
export declare class Deployment {
    readonly id: string;
    private readonly limits;
    readonly fields: DeploymentFields;
    /** Views following it now; while one does, its topics are subscribed and it is never forgotten. */
    views: number;
    /** Where the first of those views asked its replay to start. */
    since: number | null;
    readonly resyncListeners: Set<(topic: Topic) => void>;
    private statusEventId;
    private progressEventId;
    /** Log events up to this id were dropped by the limits: older ones are not taken back. */
    private logFloor;
    private logChars;
    constructor(id: string, reactive: <T extends object>(value: T) => T, limits: LogLimits);
    /** Show `initial` where no event has said anything yet. */
    applyInitial(initial: InitialState | undefined): void;
    applyStatus(id: number, data: DeploymentStatusChangedData): void;
    applyProgress(id: number, data: DeploymentProgressData): void;
    applyLogs(id: number, data: DeploymentLogsUpdateData): void;
    private addLog;
    private addEntry;
    /** A topic error: the first refusal stays; `unavailable` shows until answered. */
    refused(error: ViewError): void;
    /** A subscription of it was answered: an `unavailable` is over. */
    answered(): void;
    resynced(topic: Topic): void;
}
/**
 * A view's object: getters over whichever deployment it follows now.
 * `state` and `error` combine the deployment's refusal with the connection's.
 */
export declare function viewOf(current: () => {
    id: string;
    fields: DeploymentFields;
}, connection: () => {
    state: DeploymentWebSocket['state'];
    error: ViewError | null;
}, control: {
    reconnect(): void;
    close(): void;
}): DeploymentWebSocket;

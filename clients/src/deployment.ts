// What is known of one deployment, built from its events. No `vue` here:
// the browser entry makes `fields` reactive (it passes `shallowReactive`),
// the server entry shows `initial` as it is.
//
// Within one deployment, event ids grow in commit order (docs/events.md),
// so events from any source (live, a replay, what another view's
// subscription brought) merge by id: the latest status is the one with the
// largest id, and log lines sort by id.
import type { DeploymentLogsUpdateData, DeploymentProgressData, DeploymentStatusChangedData, Topic } from './messages.js'
import type { DeploymentWebSocket, InitialState, LogEntry, ViewError } from './types.js'

/** The reactive part: what views read. */
export interface DeploymentFields {
  name: string | null
  status: DeploymentWebSocket['status']
  errorMessage: string | null
  progress: number
  currentStep: string | null
  totalSteps: number | null
  logs: LogEntry[]
  logsTruncated: boolean
  resyncs: number
  /** A refusal (final) or `unavailable` (until its retry is answered). */
  error: ViewError | null
}

export interface LogLimits {
  maxLogEntries: number
  maxLogChars: number
}

export const DEFAULT_LIMITS: LogLimits = { maxLogEntries: 2000, maxLogChars: 2_000_000 }

/** The per-deployment topics, in the order views subscribe them. */
const TOPIC_PREFIXES = ['deployment_status_', 'deployment_logs_', 'deployment_progress_'] as const
/** Refusals: subscribing again on this connection cannot succeed. */
const REFUSALS = ['forbidden', 'invalid_topic', 'too_many_subscriptions']

export function topicsOf(id: string): Topic[] {
  return TOPIC_PREFIXES.map((prefix) => `${prefix}${id}` as Topic)
}

/** The deployment a per-deployment topic names, lowercase; `null` for any other topic. */
export function deploymentOfTopic(topic: string): string | null {
  const name = topic.toLowerCase()
  const prefix = TOPIC_PREFIXES.find((p) => name.startsWith(p))
  return prefix ? name.slice(prefix.length) : null
}

export function isRefusal(error: ViewError | null): boolean {
  return error !== null && REFUSALS.includes(error.code)
}

/** `toValue` without `vue`: a getter is called, a ref is read. */
export function readId(source: unknown): string {
  const value =
    typeof source === 'function' ? source() : source !== null && typeof source === 'object' && 'value' in source ? source.value : source
  return typeof value === 'string' ? value.trim().toLowerCase() : ''
}

export class Deployment {
  readonly fields: DeploymentFields
  /** Views following it now; while one does, its topics are subscribed and it is never forgotten. */
  views = 0
  /** Where the first of those views asked its replay to start. */
  since: number | null = 0
  readonly resyncListeners = new Set<(topic: Topic) => void>()
  private statusEventId = 0
  private progressEventId = 0
  /** Log events up to this id were dropped by the limits: older ones are not taken back. */
  private logFloor = 0
  private logChars = 0

  constructor(
    readonly id: string,
    reactive: <T extends object>(value: T) => T,
    private readonly limits: LogLimits,
  ) {
    this.fields = reactive<DeploymentFields>({
      name: null,
      status: null,
      errorMessage: null,
      progress: 0,
      currentStep: null,
      totalSteps: null,
      logs: reactive<LogEntry[]>([]),
      logsTruncated: false,
      resyncs: 0,
      error: null,
    })
  }

  /** Show `initial` where no event has said anything yet. */
  applyInitial(initial: InitialState | undefined): void {
    if (!initial) return
    const f = this.fields
    if (this.statusEventId === 0) {
      if (initial.status !== undefined) f.status = initial.status
      if (initial.errorMessage !== undefined) f.errorMessage = initial.errorMessage
      if (initial.name !== undefined) f.name = initial.name
    }
    if (this.progressEventId === 0) {
      if (initial.progress !== undefined) f.progress = initial.progress
      if (initial.currentStep !== undefined) f.currentStep = initial.currentStep
      if (initial.totalSteps !== undefined) f.totalSteps = initial.totalSteps
    }
    const lines = initial.logs ?? []
    const placeholders = lines.filter((line) => typeof line.event_id !== 'number')
    if (placeholders.length > 0 && f.logs.length === 0) {
      for (const line of placeholders) this.addEntry(entry(null, line.message, line.timestamp))
    }
    for (const line of lines) {
      if (typeof line.event_id === 'number') this.addLog(line.event_id, line.message, line.timestamp)
    }
  }

  applyStatus(id: number, data: DeploymentStatusChangedData): void {
    if (id <= this.statusEventId) return
    this.statusEventId = id
    const f = this.fields
    f.status = data.status
    f.errorMessage = data.error_message
    f.name = data.name
  }

  applyProgress(id: number, data: DeploymentProgressData): void {
    if (id <= this.progressEventId) return
    this.progressEventId = id
    const f = this.fields
    f.progress = data.progress
    f.currentStep = data.current_step
    f.totalSteps = data.total_steps
  }

  applyLogs(id: number, data: DeploymentLogsUpdateData): void {
    this.addLog(id, data.logs, data.timestamp)
  }

  private addLog(id: number, message: string, timestamp: string): void {
    if (id <= this.logFloor) return
    const logs = this.fields.logs
    if (logs.length > 0 && logs[0].event_id === null) {
      // Lines given without ids stood in until the first log event: the
      // replay brings them back with theirs.
      logs.splice(0, logs.length)
      this.logChars = 0
    }
    // Usually the newest: appended. A replay of what another source
    // already brought newer lines of goes in its place.
    let at = logs.length
    if (at > 0 && (logs[at - 1].event_id as number) >= id) {
      let low = 0
      while (low < at) {
        const mid = (low + at) >>> 1
        if ((logs[mid].event_id as number) < id) low = mid + 1
        else at = mid
      }
      if (logs[at]?.event_id === id) return
    }
    this.addEntry(entry(id, message, timestamp), at)
  }

  private addEntry(line: LogEntry, at = this.fields.logs.length): void {
    const f = this.fields
    if (at === f.logs.length) f.logs.push(line)
    else f.logs.splice(at, 0, line)
    this.logChars += line.message.length
    let drop = 0
    let chars = this.logChars
    const { maxLogEntries, maxLogChars } = this.limits
    while (f.logs.length - drop > maxLogEntries || (chars > maxLogChars && f.logs.length - drop > 1)) {
      chars -= f.logs[drop].message.length
      drop += 1
    }
    if (drop === 0) return
    const dropped = f.logs.splice(0, drop)
    this.logChars = chars
    this.logFloor = Math.max(this.logFloor, ...dropped.map((line) => line.event_id ?? 0))
    f.logsTruncated = true
  }

  /** A topic error: the first refusal stays; `unavailable` shows until answered. */
  refused(error: ViewError): void {
    if (isRefusal(this.fields.error)) return
    this.fields.error = error
  }

  /** A subscription of it was answered: an `unavailable` is over. */
  answered(): void {
    if (this.fields.error?.code === 'unavailable') this.fields.error = null
  }

  resynced(topic: Topic): void {
    this.fields.resyncs += 1
    for (const listener of this.resyncListeners) {
      try {
        listener(topic)
      } catch (error) {
        console.error('useDeploymentWebSocket: an onResync callback threw', error)
      }
    }
  }
}

function entry(event_id: number | null, message: string, timestamp: string): LogEntry {
  return Object.freeze({ event_id, message, timestamp })
}

/**
 * A view's object: getters over whichever deployment it follows now.
 * `state` and `error` combine the deployment's refusal with the connection's.
 */
export function viewOf(
  current: () => { id: string; fields: DeploymentFields },
  connection: () => { state: DeploymentWebSocket['state']; error: ViewError | null },
  control: { reconnect(): void; close(): void },
): DeploymentWebSocket {
  const state = () => (isRefusal(current().fields.error) ? 'forbidden' : connection().state)
  return {
    get deploymentId() {
      return current().id
    },
    get name() {
      return current().fields.name
    },
    get status() {
      return current().fields.status
    },
    get errorMessage() {
      return current().fields.errorMessage
    },
    get progress() {
      return current().fields.progress
    },
    get currentStep() {
      return current().fields.currentStep
    },
    get totalSteps() {
      return current().fields.totalSteps
    },
    get logs() {
      return current().fields.logs
    },
    get logsTruncated() {
      return current().fields.logsTruncated
    },
    get resyncs() {
      return current().fields.resyncs
    },
    get connected() {
      return state() === 'open' && current().id !== '' && current().fields.error === null
    },
    get state() {
      return state()
    },
    get error() {
      return current().fields.error ?? connection().error
    },
    reconnect: () => control.reconnect(),
    close: () => control.close(),
  }
}

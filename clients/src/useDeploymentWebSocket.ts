// useDeploymentWebSocket: the Vue 3 composable WindFlow's frontend planned
// (docs/client.md). It follows one deployment over windflow-notify with the
// browser client served at /client.js, which reconnects, resumes with
// `since` and drops duplicates, so the refs below never miss or repeat an
// event across a server restart.
import { onScopeDispose, readonly, ref, toValue, watch, type MaybeRefOrGetter, type Ref } from 'vue'
import { WindflowClient } from '../../assets/client.js'
import type {
  DeploymentLogsUpdateData,
  DeploymentProgressData,
  DeploymentStatus,
  DeploymentStatusChangedData,
  ErrorReply,
  Topic,
} from './messages.js'

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'unauthorized' | 'closed'

export interface DeploymentWebSocketOptions {
  /** WebSocket URL; default: `/ws` on the page's own host. */
  url?: string
  /** A JWT, or a function returning a fresh one (called before each connection). */
  token: string | (() => string | Promise<string>)
  /**
   * Replay from this event id when mounting (default 0: everything the
   * server's event log still holds about this deployment, so the logs pane
   * starts complete). `null`: live events only.
   */
  since?: number | null
  /** Known values (e.g. from WindFlow's REST API) shown until events arrive. */
  initial?: { status?: DeploymentStatus | null; progress?: number; logs?: string }
  /** WebSocket constructor; default the global one (pass `ws` in Node). */
  WebSocket?: unknown
}

export interface DeploymentWebSocket {
  /** The deployment's status; `null` until known. */
  status: Readonly<Ref<DeploymentStatus | null>>
  /** Every log line received, in order, each ending with a newline. */
  logs: Readonly<Ref<string>>
  /** 0..100. */
  progress: Readonly<Ref<number>>
  currentStep: Readonly<Ref<string | null>>
  totalSteps: Readonly<Ref<number | null>>
  /** `error_message` of the last status change (set when `failed`). */
  errorMessage: Readonly<Ref<string | null>>
  /** True while authenticated and receiving. */
  connected: Readonly<Ref<boolean>>
  state: Readonly<Ref<ConnectionState>>
  /** The last server error reply (`forbidden` for a deployment you may not see, ...). */
  lastError: Readonly<Ref<ErrorReply['data'] | null>>
  /** Close the connection now (it also closes when the component unmounts). */
  close: () => void
}

function defaultUrl(): string {
  const location = (globalThis as { location?: Location }).location
  if (!location) throw new Error('useDeploymentWebSocket: pass `url` outside a browser')
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`
}

function topics(id: string): Topic[] {
  // deployment_events carries the status changes (owners get them anyway,
  // organization members only by subscribing); the other two are this
  // deployment's own topics.
  return ['deployment_events', `deployment_logs_${id}`, `deployment_progress_${id}`]
}

export function useDeploymentWebSocket(
  deploymentId: MaybeRefOrGetter<string>,
  options: DeploymentWebSocketOptions,
): DeploymentWebSocket {
  const status = ref<DeploymentStatus | null>(options.initial?.status ?? null)
  const logs = ref(options.initial?.logs ?? '')
  const progress = ref(options.initial?.progress ?? 0)
  const currentStep = ref<string | null>(null)
  const totalSteps = ref<number | null>(null)
  const errorMessage = ref<string | null>(null)
  const state = ref<ConnectionState>('closed')
  const connected = ref(false)
  const lastError = ref<ErrorReply['data'] | null>(null)

  const since = options.since === undefined ? 0 : options.since
  let client: WindflowClient | null = null

  // One connection per followed deployment: switching deployments opens a
  // fresh one, so the new deployment's history is replayed instead of
  // being dropped as already seen by the old connection's de-duplication.
  function follow(id: string): WindflowClient {
    const next = new WindflowClient({ url: options.url ?? defaultUrl(), token: options.token, WebSocket: options.WebSocket })
    next.on('state', (value: ConnectionState) => {
      state.value = value
      connected.value = value === 'open'
    })
    next.on('error', (error: ErrorReply['data']) => {
      lastError.value = error
    })
    next.on('DEPLOYMENT_STATUS_CHANGED', (data: DeploymentStatusChangedData) => {
      if (data.deployment_id !== id) return
      status.value = data.status
      errorMessage.value = data.error_message
    })
    next.on('DEPLOYMENT_PROGRESS', (data: DeploymentProgressData) => {
      if (data.deployment_id !== id) return
      progress.value = data.progress
      currentStep.value = data.current_step
      totalSteps.value = data.total_steps
    })
    next.on('DEPLOYMENT_LOGS_UPDATE', (data: DeploymentLogsUpdateData) => {
      if (data.deployment_id !== id) return
      const line = data.logs.endsWith('\n') ? data.logs : `${data.logs}\n`
      logs.value = data.append ? logs.value + line : line
    })
    for (const topic of topics(id)) next.subscribe(topic, { since })
    next.connect()
    return next
  }

  watch(
    () => toValue(deploymentId).toLowerCase(),
    (id, previous) => {
      client?.close()
      if (previous !== undefined) {
        status.value = null
        logs.value = ''
        progress.value = 0
        currentStep.value = totalSteps.value = errorMessage.value = null
        lastError.value = null
      }
      client = follow(id)
    },
    { immediate: true },
  )

  const close = () => client?.close()
  onScopeDispose(close)

  return {
    status: readonly(status),
    logs: readonly(logs),
    progress: readonly(progress),
    currentStep: readonly(currentStep),
    totalSteps: readonly(totalSteps),
    errorMessage: readonly(errorMessage),
    connected: readonly(connected),
    state: readonly(state),
    lastError: readonly(lastError),
    close,
  }
}

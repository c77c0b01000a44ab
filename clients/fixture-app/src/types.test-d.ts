// Type-level checks, run by `vue-tsc --noEmit`: the package's types are the
// real ones in this app (not `any`), and refs made with the app's own `vue`
// from a view are the app's refs.
import { ref, toRefs, type Ref } from 'vue'
import {
  createWindflow,
  useDeploymentWebSocket,
  type DeploymentStatus,
  type DeploymentWebSocket,
  type LogEntry,
  type ServerMessage,
} from 'windflow-notify-clients'
import { WindflowClient } from 'windflow-notify-clients/client'

export function checks(): void {
  const view: DeploymentWebSocket = useDeploymentWebSocket(ref('id'), { token: () => 't', since: null })
  const status: DeploymentStatus | null = view.status
  const lines: readonly LogEntry[] = view.logs
  const first: number | null = lines[0].event_id
  // @ts-expect-error a status is not a number (were the types `any`, this would be no error)
  const wrong: number = view.status
  // @ts-expect-error a view is read-only
  view.progress = 3
  const { progress, logs } = toRefs(view)
  const progressRef: Readonly<Ref<number>> = progress
  // @ts-expect-error the refs carry the view's types
  const notLogs: Ref<string> = logs
  // @ts-expect-error `initial.status` must be a status
  useDeploymentWebSocket(() => 'id', { token: 't', initial: { status: 'done' } })
  const client = new WindflowClient({ url: 'ws://x/ws', token: 't' })
  client.on('message', (message: ServerMessage) => message.type)
  createWindflow({ token: 't' }).reconnect()
  void [status, first, wrong, progressRef, notLogs]
}

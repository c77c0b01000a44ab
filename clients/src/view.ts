// useDeploymentWebSocket: the Vue 3 composable (docs/client.md). A view
// follows one deployment over the page's shared connection and reads
// what is known of it as a read-only reactive object.
import { getCurrentScope, hasInjectionContext, inject, onScopeDispose, shallowReactive, shallowReadonly, shallowRef, watch } from 'vue'
import { Connection, WINDFLOW, connectionOf, sharedConnection } from './connection.js'
import { DEFAULT_LIMITS, Deployment, readId, viewOf } from './deployment.js'
import type { DeploymentViewState, UseDeploymentWebSocket, ViewError, Windflow } from './types.js'

const CLOSED: { state: DeploymentViewState; error: ViewError | null } = Object.freeze({ state: 'closed', error: null })

function connectionFor(options: Parameters<UseDeploymentWebSocket>[1] = {}): Connection {
  const explicit = options.windflow && connectionOf(options.windflow)
  if (explicit) return explicit
  const { token } = options
  if (token !== undefined) return sharedConnection({ ...options, token })
  const provided = hasInjectionContext() ? inject<Windflow | null>(WINDFLOW, null) : null
  const connection = provided && connectionOf(provided)
  if (connection) return connection
  throw new Error('useDeploymentWebSocket: pass `token`, or install `createWindflow({ token })` with `app.use()`')
}

export const useDeploymentWebSocket: UseDeploymentWebSocket = (deploymentId, options = {}) => {
  const found = connectionFor(options)
  // Outside a browser (server-side rendering) nothing is opened: the view
  // shows `initial`, and the browser connects when it takes over.
  const connection = found.canOpen() ? found : null
  const since = options.since === undefined ? 0 : options.since
  const { onResync } = options
  let initial = options.initial
  let attached: Deployment | null = null
  const closed = shallowRef(false)
  const current = shallowRef<Deployment>(new Deployment('', shallowReactive, DEFAULT_LIMITS))

  const release = () => {
    if (attached) connection?.detach(attached, onResync)
    attached = null
  }
  const follow = (id: string) => {
    release()
    if (id !== '' && connection) {
      attached = connection.attach(id, { since, initial, onResync })
      current.value = attached
    } else {
      const shown = new Deployment(id, shallowReactive, DEFAULT_LIMITS)
      shown.applyInitial(initial)
      current.value = shown
    }
    // `initial` describes the deployment the view starts with.
    initial = undefined
  }
  const stop = watch(() => readId(deploymentId), follow, { immediate: true })

  const close = () => {
    if (closed.value) return
    closed.value = true
    stop()
    release()
  }
  if (getCurrentScope()) onScopeDispose(close)

  return shallowReadonly(
    viewOf(
      () => current.value,
      () => (closed.value || !connection ? CLOSED : (connection.status as typeof CLOSED)),
      {
        reconnect: () => {
          if (attached && connection) connection.retry(attached)
        },
        close,
      },
    ),
  )
}

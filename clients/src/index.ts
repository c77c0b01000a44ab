export { useDeploymentWebSocket } from './useDeploymentWebSocket.js'
export type { ConnectionState, DeploymentWebSocket, DeploymentWebSocketOptions } from './useDeploymentWebSocket.js'
export type * from './messages.js'

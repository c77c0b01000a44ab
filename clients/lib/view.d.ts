import type { UseDeploymentWebSocket } from './types.js';
export declare const useDeploymentWebSocket: UseDeploymentWebSocket;

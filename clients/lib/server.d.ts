import type { CreateWindflow, UseDeploymentWebSocket } from './types.js';
export { WindflowClient, topicCarries } from './client.js';
export type * from './types.js';
export type * from './messages.js';
export declare const useDeploymentWebSocket: UseDeploymentWebSocket;
export declare const createWindflow: CreateWindflow;

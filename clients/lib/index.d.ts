import type { CreateWindflow } from './types.js';
export { useDeploymentWebSocket } from './view.js';
export { WindflowClient, topicCarries } from './client.js';
export type * from './types.js';
export type * from './messages.js';
export declare const createWindflow: CreateWindflow;

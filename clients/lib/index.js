// The browser entry of `windflow-notify-clients` (server-side rendering
// gets src/server.ts instead, through the `node` export condition). Typed
// through types.ts only, so the shipped declarations never name `vue`.
import { createWindflow as create } from './connection.js';
export { useDeploymentWebSocket } from './view.js';
export { WindflowClient, topicCarries } from './client.js';
export const createWindflow = create;

// The entry of `windflow-notify-clients` for server-side rendering (the
// `node` export condition): the same API, showing `initial` and opening
// nothing. It imports no `vue`, so an app builds for SSR whether or not
// `vue` resolves from the checkout the package is linked from.
import { DEFAULT_LIMITS, Deployment, readId, viewOf } from './deployment.js';
export { WindflowClient, topicCarries } from './client.js';
const NOTHING = { reconnect() { }, close() { } };
const CLOSED = Object.freeze({ state: 'closed', error: null });
export const useDeploymentWebSocket = (deploymentId, options = {}) => {
    const shown = new Deployment(readId(deploymentId), (value) => value, DEFAULT_LIMITS);
    shown.applyInitial(options.initial);
    return Object.freeze(viewOf(() => shown, () => CLOSED, NOTHING));
};
export const createWindflow = () => {
    const windflow = {
        install() { },
        state: 'closed',
        error: null,
        client: null,
        ...NOTHING,
    };
    return windflow;
};

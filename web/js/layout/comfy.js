// The frontend's `app` and `api` objects, read from `window.comfyAPI`, where the frontend publishes every
// module's exports (its own /scripts/app.js and /scripts/api.js are shims that re-export exactly these).
// Reading them here keeps our modules free of "../../../scripts/app.js" paths, which depend on how deep a
// file sits under web/. Read on call, not at import: importing a module of this pack must do nothing.

/** The ComfyApp instance (graph, canvas, registerExtension); undefined outside the frontend. */
export const comfyApp = () => globalThis.comfyAPI?.app?.app;

/** The ComfyApi instance (websocket events such as "executed"); undefined outside the frontend. */
export const comfyApi = () => globalThis.comfyAPI?.api?.api;

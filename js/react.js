// wattgate React SDK (the "wattfare/react" surface): <WattfareProvider> and useWattfare().
// Plain ES module, no JSX, no build step; React is a peer dependency.
//
//   <WattfareProvider publishableKey="pk_live_…" session="/api/wattfare-token" baseURL="https://gw…">
//     <App />
//   </WattfareProvider>
//
//   const { connected, remainingUsd, connect } = useWattfare();
//   <button onClick={connect}>Connect AI budget</button>   // the popup opens inside the click
import { createContext, createElement, useCallback, useContext, useEffect, useMemo, useRef, useState } from "react";
import { createWattfare } from "./client.js";

/**
 * @typedef {import("./client.js").ConnectionStatus} ConnectionStatus
 * @typedef {import("./client.js").GrantResult} GrantResult
 * @typedef {object} WattfareState
 * @property {boolean} connected
 * @property {{ monthlyUsd: number | null } | null} limits
 * @property {{ monthlyUsd: number }} usage
 * @property {number | null} remainingUsd
 * @property {number} heldUsd held by calls in flight (wattgate extension); 0 until read
 * @property {boolean} loading true while status is read or the popup is open
 * @property {Error | null} error the last error of status/connect/disconnect (typed WattfareError)
 * @property {() => Promise<ConnectionStatus>} connect opens the consent popup
 * @property {() => Promise<void>} disconnect
 * @property {(request: { requests: number, maxUsd?: number | null }) => Promise<GrantResult | null>} requestGrant
 *   opens the grant popup; never changes connected/limits/usage/remainingUsd
 * @property {() => Promise<ConnectionStatus | null>} refresh re-read the status
 */

const WattfareContext = createContext(/** @type {WattfareState | null} */ (null));

/**
 * Provides the connection state to useWattfare(). Pass `client` (from createWattfare) or the
 * client options; a `session` function may change identity between renders freely.
 * @param {{ publishableKey?: string, session?: import("./client.js").SessionSource,
 *   baseURL?: string, client?: ReturnType<typeof createWattfare>, children?: any }} props
 */
export function WattfareProvider({ publishableKey, session, baseURL, client, children }) {
  const sessionRef = useRef(session);
  sessionRef.current = session;
  const sessionKind = typeof session === "function" ? "function" : session;
  const wf = useMemo(() => client ?? createWattfare({
    publishableKey: /** @type {string} */ (publishableKey), baseURL,
    session: sessionKind === "function"
      ? () => /** @type {Function} */ (sessionRef.current)()
      : /** @type {string} */ (sessionKind),
  }), [client, publishableKey, baseURL, sessionKind]);

  const [status, setStatus] = useState(/** @type {ConnectionStatus | null} */ (null));
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState(/** @type {Error | null} */ (null));
  const alive = useRef(true);
  useEffect(() => () => { alive.current = false; }, []);

  const track = useCallback((/** @type {Promise<any>} */ promise, /** @type {boolean} */ updates) => {
    setLoading(true);
    return promise.then((value) => {
      if (alive.current) {
        if (updates) setStatus(value);
        setError(null);
      }
      return value;
    }, (err) => {
      if (alive.current) setError(err);
      throw err;
    }).finally(() => { if (alive.current) setLoading(false); });
  }, []);

  const refresh = useCallback(() => track(wf.status(), true).catch(() => null), [wf, track]);
  // wf.connect() is called synchronously in the click that called connect(): popups survive.
  const connect = useCallback(() => track(wf.connect(), true), [wf, track]);
  const disconnect = useCallback(
    () => track(wf.disconnect(), false).then(() => { refresh(); }), [wf, track, refresh]);
  const requestGrant = useCallback((request) => wf.requestGrant(request), [wf]);

  useEffect(() => { refresh(); }, [refresh]);

  const value = useMemo(() => ({
    connected: status?.connected ?? false,
    limits: status?.limits ?? null,
    usage: status?.usage ?? { monthlyUsd: 0 },
    remainingUsd: status ? status.remainingUsd : null,
    heldUsd: status?.heldUsd ?? 0,
    loading, error, connect, disconnect, requestGrant, refresh,
  }), [status, loading, error, connect, disconnect, requestGrant, refresh]);

  return createElement(WattfareContext.Provider, { value }, children);
}

/** The connection state and actions; must be used inside <WattfareProvider>. @returns {WattfareState} */
export function useWattfare() {
  const value = useContext(WattfareContext);
  if (!value) throw new Error("useWattfare() must be used inside <WattfareProvider>.");
  return value;
}

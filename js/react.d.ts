// Types for wattgate/react (react.js). Hand-written beside the plain ES module; a test
// checks that they declare exactly what the module exports.
import type { ReactElement, ReactNode } from "react";
import type {
  ConnectionStatus, GrantRequest, GrantResult, SessionSource, WattfareClient,
} from "./client.js";

export type { ConnectionStatus, GrantRequest, GrantResult, SessionSource } from "./client.js";

/** What useWattfare() returns: the connection state and the actions. */
export interface WattfareState {
  connected: boolean;
  limits: { monthlyUsd: number | null } | null;
  usage: { monthlyUsd: number };
  remainingUsd: number | null;
  /** Held by calls in flight (wattgate extension; see ConnectionStatus.heldUsd); 0 until read. */
  heldUsd: number;
  /** true while the status is read or the popup is open */
  loading: boolean;
  /** the last error of status/connect/disconnect (a WattfareError) */
  error: Error | null;
  /** Opens the consent popup: call it straight from a click handler. */
  connect(): Promise<ConnectionStatus>;
  disconnect(): Promise<void>;
  /** Opens the grant popup; never changes connected/limits/usage/remainingUsd. */
  requestGrant(request: GrantRequest): Promise<GrantResult | null>;
  /** Re-read the status (null when that failed: see `error`). */
  refresh(): Promise<ConnectionStatus | null>;
}

/** Pass a `client` made with createWattfare, or the client options. */
export type WattfareProviderProps = {
  children?: ReactNode;
} & (
  | { client: WattfareClient; publishableKey?: undefined; session?: undefined; baseURL?: undefined }
  | { client?: undefined; publishableKey: string; session: SessionSource; baseURL?: string }
);

/** Provides the connection state to useWattfare(). */
export declare function WattfareProvider(props: WattfareProviderProps): ReactElement;

/** The connection state and actions; must be used inside <WattfareProvider>. */
export declare function useWattfare(): WattfareState;

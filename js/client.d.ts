// Types for wattgate/client (client.js). Hand-written beside the plain ES module; a test
// checks that they declare exactly what the module exports.

/** A user's connection and budget, as the gateway reports it. */
export interface ConnectionStatus {
  connected: boolean;
  limits: { monthlyUsd: number | null } | null;
  usage: { monthlyUsd: number };
  /** The cap minus the usage (the reference's definition); null when unlimited. */
  remainingUsd: number | null;
  /**
   * wattgate extension: held at their worst case by this month's calls in flight. A new
   * call fits in `remainingUsd - heldUsd`; each hold becomes the call's real cost (usually
   * far less) when it settles.
   */
  heldUsd: number;
}

/** An approved one-time grant: forward `grantToken` to your backend. */
export interface GrantResult {
  grantToken: string;
  /** Unix seconds. */
  expiresAt: number;
  requests: number;
}

/** A session token minted by your backend (`createSession` / `sessionHandler`). */
export interface CreatedSession {
  token: string;
  /** Unix seconds. */
  expiresAt: number;
}

/**
 * The app's token route (POSTed to, answers `{ token, expiresAt }`), or a function
 * returning that object.
 */
export type SessionSource = string | (() => CreatedSession | Promise<CreatedSession>);

export interface GrantRequest {
  /** Whole number of model calls, at least 1. */
  requests: number;
  /** Optional dollar cap over all of the grant's calls. */
  maxUsd?: number | null;
}

export interface WattfareClientOptions {
  /** `pk_live_…`: names the app to the consent popup. */
  publishableKey: string;
  /** Where session tokens come from. */
  session: SessionSource;
  /**
   * The gateway's URL. Defaults to the origin this module was loaded from when it is the
   * gateway's `/sdk/client.js`.
   */
  baseURL?: string;
  /** A custom fetch (tests, unusual runtimes). */
  fetch?: typeof fetch;
  /** Clock in milliseconds (tests); defaults to `Date.now`. */
  now?: () => number;
}

export interface WattfareClient {
  readonly publishableKey: string;
  readonly baseURL: string;
  /**
   * Open the consent popup (call it straight from a click handler); resolves to the status
   * after the user's choice. A denial or a closed popup resolves to the current status.
   */
  connect(): Promise<ConnectionStatus>;
  status(): Promise<ConnectionStatus>;
  /** Revoke this user's connection to the app. */
  disconnect(): Promise<void>;
  /** Ask for a one-time grant; null when the user denies or closes the popup. */
  requestGrant(request: GrantRequest): Promise<GrantResult | null>;
}

/** Seconds before a token's expiry at which a cached token is no longer used. */
export declare const TOKEN_REFRESH_MARGIN_SECONDS: number;

/** The status of a user who has not connected. */
export declare const NOT_CONNECTED: Readonly<ConnectionStatus>;

export interface WattfareErrorInfo {
  code?: string;
  status?: number;
  cause?: unknown;
}

/** Every error of this package: `code` and `status` are the gateway's. */
export declare class WattfareError extends Error {
  constructor(message: string, info?: WattfareErrorInfo);
  /** e.g. "budget_exceeded", "grant_invalid", "popup_blocked". */
  code: string;
  /** The HTTP status (0 for errors that never reached the gateway). */
  status: number;
}
export declare class WattfareAuthError extends WattfareError {
  static code: "auth"; static status: 401;
}
export declare class WattfareInvalidRequestError extends WattfareError {
  static code: "invalid_request"; static status: 400;
}
export declare class WattfareConsentError extends WattfareError {
  static code: "consent_required"; static status: 403;
}
export declare class WattfareNotConnectedError extends WattfareError {
  static code: "not_connected"; static status: 402;
}
export declare class WattfareBudgetError extends WattfareError {
  static code: "budget_exceeded"; static status: 402;
}
export declare class WattfareGrantError extends WattfareError {
  static code: "grant_invalid"; static status: 402;
}
export declare class WattfareFundingError extends WattfareError {
  static code: "funding_invalid"; static status: 402;
}
export declare class WattfareRateLimitError extends WattfareError {
  static code: "rate_limited"; static status: 429;
  constructor(message: string, info?: WattfareErrorInfo & { retryAfter?: number });
  /** Seconds to wait, from Retry-After. */
  retryAfter: number | null;
}
export declare class WattfareUpstreamError extends WattfareError {
  static code: "upstream"; static status: 502;
}
export declare class WattfarePopupError extends WattfareError {
  static code: "popup_blocked"; static status: 0;
}
export declare class WattfareNetworkError extends WattfareError {
  static code: "network"; static status: 0;
}

/** The typed error for a server's error answer `{ error: { code, message } }`. */
export declare function errorFromResponse(
  status: number, body: unknown, headers?: { get(name: string): string | null },
): WattfareError;

/**
 * A WattfareError for anything thrown by this SDK or wrapping a gateway answer
 * (e.g. an AI SDK APICallError), else null.
 */
export declare function toWattfareError(err: unknown): WattfareError | null;

/** Create the browser client. */
export declare function createWattfare(options: WattfareClientOptions): WattfareClient;

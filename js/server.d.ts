// Types for wattgate/server (server.js). Hand-written beside the plain ES module; a test
// checks that they declare exactly what the module exports.
import type {
  OpenAICompatibleChatLanguageModel, OpenAICompatibleProviderSettings, createOpenAICompatible,
} from "@ai-sdk/openai-compatible";
import type { ConnectionStatus, CreatedSession } from "./client.js";
import { WattfareError } from "./client.js";

export {
  NOT_CONNECTED, WattfareError, WattfareAuthError, WattfareInvalidRequestError,
  WattfareConsentError, WattfareNotConnectedError, WattfareBudgetError, WattfareGrantError,
  WattfareFundingError, WattfareRateLimitError, WattfareUpstreamError,
} from "./client.js";
export type { ConnectionStatus, CreatedSession, GrantResult } from "./client.js";

/** The AI SDK language model `model()` returns (pass it to generateText, streamText, …). */
export type LanguageModel = OpenAICompatibleChatLanguageModel;

/**
 * The provider's settings for one model, e.g. `{ supportsStructuredOutputs: true }`. Where
 * calls go and with which key is the client's: `name`, `baseURL`, `apiKey` and `fetch` are
 * refused, and `headers` can never replace the user or grant header.
 */
export type ModelSettings = Omit<OpenAICompatibleProviderSettings, "name" | "baseURL" | "apiKey" | "fetch">;

/** The cap a session token asks the user to approve. */
export interface SessionRequest {
  requestLimit?: { monthlyUsd?: number | null };
}

export interface WattfareOptions {
  /** The app's secret key (`sk_…`); never send it to a browser. */
  secretKey: string;
  /** The gateway's URL (its site root; `…/api/v1` is accepted too). */
  baseURL?: string;
  /** A custom fetch, for tests or unusual runtimes. */
  fetch?: typeof fetch;
  /**
   * Your app's provider factory, used by `model()`: pass it with a plain path install
   * (`npm install path/to/wattgate/js`, a symlink), or to be sure `model()` uses your
   * app's copy. Default: the one this package imports itself.
   */
  createOpenAICompatible?: typeof createOpenAICompatible;
}

/** The gateway's default listen address (`wattgate serve` with no config). */
export declare const DEFAULT_BASE_URL: string;
export declare const USER_HEADER: "x-wattfare-user";
export declare const GRANT_HEADER: "x-wattfare-grant";
export declare const GRANT_REMAINING_HEADER: "x-wattfare-grant-remaining";

/**
 * The WattfareError behind `err`, or null. Sees through the AI SDK's errors (APICallError,
 * RetryError, a provider failure inside a stream), the openai package's APIError and
 * `cause` chains.
 */
export declare function toWattfareError(err: unknown): WattfareError | null;

declare abstract class ModelAccess {
  /**
   * An AI SDK language model whose calls go through the gateway, billed here.
   * @param modelId Any OpenRouter model id, e.g. "openai/gpt-4o-mini".
   * @param settings The provider's settings, e.g. `{ supportsStructuredOutputs: true }`.
   */
  model(modelId: string, settings?: ModelSettings): LanguageModel;
}

/** One of your users: inference billed to their budget, and their status. */
export declare class WattfareUser extends ModelAccess {
  constructor(wf: Wattfare, appUserId: string);
  readonly appUserId: string;
  /** The user's connection and budget; `{ connected: false, … }` for a user who never connected. */
  status(): Promise<ConnectionStatus>;
}

/** A one-time grant redeemed by your backend: each model call spends one of its requests. */
export declare class WattfareGrant extends ModelAccess {
  constructor(wf: Wattfare, grantToken: string);
}

export declare class Wattfare {
  constructor(options: WattfareOptions);
  readonly secretKey: string;
  readonly baseURL: string;
  readonly apiURL: string;
  readonly fetch: typeof fetch;
  /** The provider factory `model()` uses: the one passed in, or this package's own (null if none resolves). */
  readonly createOpenAICompatible: typeof createOpenAICompatible | null;
  /** Scope model access and status to one of your own user ids (42 and "42" are one user). */
  user(appUserId: string | number): WattfareUser;
  /** Redeem a one-time grant token forwarded by the browser. */
  grant(grantToken: string): WattfareGrant;
  /** Mint a short-lived session token for your frontend. */
  createSession(appUserId: string | number, request?: SessionRequest): Promise<CreatedSession>;
  /**
   * A `Request → Response` handler for your token route (e.g. a Next.js route's POST).
   * `resolveUser(req)` returns your user id, or null to answer 401.
   */
  sessionHandler(
    resolveUser: (req: Request) => string | number | null | undefined | Promise<string | number | null | undefined>,
    request?: SessionRequest | ((req: Request) => SessionRequest | Promise<SessionRequest>),
  ): (req: Request) => Promise<Response>;
}

/** The header a wattgate webhook delivery is signed in. */
export declare const SIGNATURE_HEADER: "Wattgate-Signature";
/** Seconds either way a signature's timestamp is accepted. */
export declare const WEBHOOK_TOLERANCE: number;

/** A delivery whose signature does not hold (code `webhook_signature`, status 400). */
export declare class WattfareWebhookError extends WattfareError {
  static code: "webhook_signature";
  static status: 400;
}

/** A budget event as delivered: `data` names the app, the user and amounts (decimal strings, USD). */
export interface WebhookEvent {
  id: string;
  type: "connection.created" | "connection.cap_changed" | "connection.revoked"
    | "budget.threshold" | "funding.invalid" | "grant.exhausted" | (string & {});
  created: number;
  data: Record<string, unknown>;
}

/**
 * The event a delivery carries once its `Wattgate-Signature` proves the raw body was signed
 * with `secret` within `tolerance` seconds (default 300) of `now` (unix seconds); otherwise
 * rejects with a WattfareWebhookError.
 */
export declare function verifyWebhook(
  body: string | Uint8Array | ArrayBuffer, signature: string | null | undefined, secret: string,
  options?: { tolerance?: number; now?: number },
): Promise<WebhookEvent>;

// A backend of a team's own app, using wattgate/server with its own ai and provider.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, streamText } from "ai";
import { z } from "zod";
import {
  Wattfare, WattfareNotConnectedError, toWattfareError,
  type ConnectionStatus, type LanguageModel, type ModelSettings,
} from "wattgate/server";

// With a plain path install (a symlink) the app passes its own provider factory; a copied
// install (tarball, --install-links) finds the app's provider by itself.
const wf = new Wattfare({
  secretKey: process.env.WATTFARE_SECRET_KEY ?? "", baseURL: process.env.WATTGATE_URL,
  ...(process.env.PASS_PROVIDER === "1" ? { createOpenAICompatible } : {}),
});
const ai = wf.user("consumer_user");
const settings: ModelSettings = { supportsStructuredOutputs: true };
const model: LanguageModel = ai.model("openai/gpt-4o-mini", settings);

/** Mistakes the declarations catch (never called). */
export function mistakes(): void {
  // @ts-expect-error the settings are typed: a flag is a boolean
  ai.model("openai/gpt-4o-mini", { supportsStructuredOutputs: "yes" });
  // @ts-expect-error where calls go is the client's, not a model's
  ai.model("openai/gpt-4o-mini", { baseURL: "https://elsewhere.example" });
  // @ts-expect-error a session request is checked too
  void wf.createSession("u", { requestLimit: { monthlyUsd: "20" } });
}

export const tokenRoute: (req: Request) => Promise<Response> = wf.sessionHandler(
  (req) => req.headers.get("x-user"), { requestLimit: { monthlyUsd: 20 } });

const { text } = await generateText({ model, prompt: "Say hello." });
let streamed = "";
for await (const piece of streamText({ model, prompt: "Say hello." }).textStream) streamed += piece;
const film = await generateObject({
  model, prompt: "A film.",
  schema: z.object({ title: z.string(), year: z.number().int() }),
});
const title: string = film.object.title;
const status: ConnectionStatus = await ai.status();

const refused = await generateText({ model: wf.user("never_connected").model("openai/gpt-4o-mini"), prompt: "x" })
  .then(() => null, (err: unknown) => toWattfareError(err));

console.log(JSON.stringify({
  text, streamed, title, year: film.object.year, warnings: film.warnings ?? [],
  usage: status.usage.monthlyUsd, held: status.heldUsd, refused: refused?.code ?? null,
  refusedTyped: refused instanceof WattfareNotConnectedError,
}));

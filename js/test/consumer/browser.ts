// The same app's frontend: the browser client and the React hook, type-checked only.
import { createElement, type ReactElement } from "react";
import { createWattfare, toWattfareError, type WattfareClient } from "wattgate/client";
import { WattfareProvider, useWattfare } from "wattgate/react";

const client: WattfareClient = createWattfare({
  publishableKey: "pk_live_app", session: "/api/wattfare-token", baseURL: "https://gw.example",
});

export async function onConnectClick(): Promise<number | null> {
  try {
    return (await client.connect()).remainingUsd;
  } catch (err) {
    const wfErr = toWattfareError(err);
    if (wfErr?.code === "popup_blocked") return null;
    throw err;
  }
}

function Budget(): ReactElement {
  const { connected, remainingUsd, heldUsd, loading, connect, requestGrant } = useWattfare();
  const held: number = heldUsd; // in flight: a new call fits in what is left minus this
  const label: string = loading ? "…" : connected ? `$${remainingUsd ?? "∞"} left, $${held} held` : "Connect AI budget";
  const onClick = (): void => {
    void connect();
    void requestGrant({ requests: 3, maxUsd: 1 }).then((grant) => grant?.grantToken);
  };
  return createElement("button", { onClick }, label);
}

export const app: ReactElement = createElement(WattfareProvider, { client }, createElement(Budget));
export const app2: ReactElement = createElement(WattfareProvider,
  { publishableKey: "pk_live_app", session: async () => ({ token: "t", expiresAt: 0 }) }, createElement(Budget));

/** Mistakes the declarations catch (never called). */
export function mistakes(): void {
  // @ts-expect-error a grant needs its request count
  void client.requestGrant({ maxUsd: 1 });
  // @ts-expect-error the client needs a session source
  createWattfare({ publishableKey: "pk_live_app" });
  // @ts-expect-error the provider takes a client or the client's options, not neither
  createElement(WattfareProvider, { baseURL: "https://gw.example" });
}

// The same app's page in JSX, as a Next.js client component would write it (type-checked only).
import { WattfareProvider, useWattfare } from "wattgate/react";

function Budget() {
  const { connected, remainingUsd, loading, error, connect, disconnect } = useWattfare();
  if (error) return <p role="alert">{error.message}</p>;
  return connected
    ? <button disabled={loading} onClick={() => void disconnect()}>${remainingUsd ?? "∞"} left: disconnect</button>
    : <button disabled={loading} onClick={connect}>Connect AI budget</button>;
}

export default function Page() {
  return (
    <WattfareProvider publishableKey="pk_live_app" session="/api/wattfare-token" baseURL="https://gw.example">
      <Budget />
    </WattfareProvider>
  );
}

// @ts-expect-error without a client the provider needs a session source
export const missingSession = <WattfareProvider publishableKey="pk_live_app"><Budget /></WattfareProvider>;

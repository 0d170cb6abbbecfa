// Calls to the proxy's page session endpoints and admin API. The session
// cookie is HttpOnly, so scripts never see it. State-changing calls carry the
// session's CSRF token in a header.

import type { ProviderName } from "./providers";

export type Source = "shared" | "byok";

export interface ProviderStatus {
  source: Source;
  has_key: boolean;
  last4: string;
  updated_at: string | null;
}

export interface MailboxStatus {
  mailbox: string;
  providers: Partial<Record<ProviderName, ProviderStatus>>;
}

export interface TestResult {
  ok: boolean;
  status: number;
  error: string;
}

// SessionLost is thrown when the proxy responds with 401 because the session
// expired, was signed out, or the admin token changed.
export class SessionLost extends Error {
  constructor() {
    super("The session has ended.");
    this.name = "SessionLost";
  }
}

// ApiError carries the proxy's error message and HTTP status.
export class ApiError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

let csrfToken = "";

async function request<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
  }
  if (csrfToken !== "") {
    headers["X-CSRF-Token"] = csrfToken;
  }
  let res: Response;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
      redirect: "error",
    });
  } catch {
    throw new ApiError(0, "Could not reach the proxy. Check that it is running and try again.");
  }
  if (res.status === 401) {
    throw new SessionLost();
  }
  if (res.status === 204) {
    return undefined as T;
  }
  const data: unknown = await res.json().catch(() => null);
  if (!res.ok) {
    throw new ApiError(res.status, errorMessage(data) ?? `The proxy responded with HTTP ${res.status}.`);
  }
  return data as T;
}

function errorMessage(data: unknown): string | undefined {
  if (typeof data !== "object" || data === null) {
    return undefined;
  }
  const err = (data as { error?: { message?: unknown } }).error;
  return typeof err?.message === "string" ? err.message : undefined;
}

interface SessionResponse {
  csrf_token: string;
  expires_at: string;
}

// signIn starts a session with the admin token and returns when it expires.
// A wrong token is an ApiError with status 401, not SessionLost.
export async function signIn(adminToken: string): Promise<string> {
  let res: Response;
  try {
    res = await fetch("/ui/session", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ token: adminToken }),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "Could not reach the proxy. Check that it is running and try again.");
  }
  const data: unknown = await res.json().catch(() => null);
  if (res.status === 401) {
    throw new ApiError(401, "Invalid admin token. Use the value of admin.token, or the contents of the file that admin.token_file names.");
  }
  if (!res.ok) {
    throw new ApiError(res.status, errorMessage(data) ?? `Sign-in failed with HTTP ${res.status}.`);
  }
  const session = data as SessionResponse;
  csrfToken = session.csrf_token;
  return session.expires_at;
}

// resumeSession picks up the session of an earlier page load, if its cookie
// is still valid, and returns when it expires (null without a session).
export async function resumeSession(): Promise<string | null> {
  try {
    const data = await request<SessionResponse>("GET", "/ui/session");
    csrfToken = data.csrf_token;
    return data.expires_at;
  } catch (err) {
    if (err instanceof SessionLost) {
      return null;
    }
    throw err;
  }
}

export async function signOut(): Promise<void> {
  try {
    await request<void>("DELETE", "/ui/session");
  } finally {
    csrfToken = "";
  }
}

function providerPath(mailbox: string, provider: ProviderName, rest: string): string {
  return `/admin/v1/mailboxes/${encodeURIComponent(mailbox)}/providers/${provider}/${rest}`;
}

export function getMailbox(mailbox: string): Promise<MailboxStatus> {
  return request("GET", `/admin/v1/mailboxes/${encodeURIComponent(mailbox)}`);
}

export async function getRecipient(): Promise<string> {
  const data = await request<{ recipient: string }>("GET", "/admin/v1/recipient");
  return data.recipient;
}

// putSealedKey stores a key that was encrypted in this browser; armored is
// the age ciphertext, never the key itself.
export function putSealedKey(mailbox: string, provider: ProviderName, armored: string): Promise<ProviderStatus> {
  return request("PUT", providerPath(mailbox, provider, "key"), { age: armored });
}

export function deleteKey(mailbox: string, provider: ProviderName): Promise<void> {
  return request("DELETE", providerPath(mailbox, provider, "key"));
}

export function setSource(mailbox: string, provider: ProviderName, source: Source): Promise<ProviderStatus> {
  return request("PUT", providerPath(mailbox, provider, "source"), { source });
}

export function testKey(mailbox: string, provider: ProviderName): Promise<TestResult> {
  return request("POST", providerPath(mailbox, provider, "test"));
}

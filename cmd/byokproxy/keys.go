package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"filippo.io/age"
	"filippo.io/age/armor"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/mailbox"
	"github.com/byokproxy/byokproxy/provider"
)

// Exit codes of the client commands.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// Environment variables of the client commands. The admin token is read
// only from the environment, never from a flag, so it stays out of the
// process list and shell history.
const (
	envAdminURL   = "BYOKPROXY_ADMIN_URL"
	envAdminToken = "BYOKPROXY_ADMIN_TOKEN"
)

const defaultAdminURL = "http://127.0.0.1:8081"

// maxKeyInput bounds the key read from standard input; real keys are a few
// hundred bytes.
const maxKeyInput = 64 << 10

// cliIO is the standard streams and environment of a client command. Tests
// replace them to run commands in-process.
type cliIO struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
	// readHidden reads one line from the terminal without echoing it. It is
	// nil when standard input is not a terminal.
	readHidden func() ([]byte, error)
}

// osIO returns the process's standard streams and environment.
func osIO() cliIO {
	cio := cliIO{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	fd := int(os.Stdin.Fd())
	if term.IsTerminal(fd) {
		cio.readHidden = func() ([]byte, error) {
			key, err := term.ReadPassword(fd)
			fmt.Fprintln(os.Stderr)
			return key, err
		}
	}
	return cio
}

// usageError is a command line that names no valid command or has the wrong
// arguments; it exits with exitUsage.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

const keysUsage = `Usage:
  byokproxy keys set MAILBOX PROVIDER            store a key read from standard input
  byokproxy keys show MAILBOX                    show each provider's source and stored key
  byokproxy keys rm MAILBOX PROVIDER             remove a key; the source returns to shared
  byokproxy keys use MAILBOX PROVIDER shared|byok
                                                 select the key source
  byokproxy keys test MAILBOX PROVIDER           send a one-token request with the stored key;
                                                 exits 1 when the provider rejects it

PROVIDER is anthropic, openai or google. "keys set" reads the key from
standard input, such as:
  printf %s "$OPENAI_KEY" | byokproxy keys set alice@example.com openai
or prompts for it without echo when standard input is a terminal. It never
takes the key as an argument. By default the key is encrypted on this machine
to the proxy's age recipient, so it travels to the proxy only as ciphertext.

Flags:
`

const tokenUsage = `Usage:
  byokproxy token issue MAILBOX    print the mailbox token of the current generation
  byokproxy token revoke MAILBOX   revoke every earlier token and print a new one

Flags:
`

const clientEnvUsage = `
Environment:
  BYOKPROXY_ADMIN_TOKEN   the proxy's admin.token (required)
  BYOKPROXY_ADMIN_URL     default of --admin

Exit status: 0 on success, 1 on failure, 2 on invalid usage.
`

// clientFlags are the flags of the keys and token commands.
type clientFlags struct {
	fs        *pflag.FlagSet
	stderr    io.Writer
	adminURL  string
	json      bool
	timeout   time.Duration
	plaintext bool
}

func newClientFlags(name, usage string, cio cliIO, withPlaintext bool) *clientFlags {
	cf := &clientFlags{fs: pflag.NewFlagSet(name, pflag.ContinueOnError), stderr: cio.stderr}
	defaultURL := cio.getenv(envAdminURL)
	if defaultURL == "" {
		defaultURL = defaultAdminURL
	}
	cf.fs.SetOutput(cio.stderr)
	cf.fs.StringVar(&cf.adminURL, "admin", defaultURL, "base `URL` of the proxy's admin API (admin.listen); env "+envAdminURL)
	cf.fs.BoolVar(&cf.json, "json", false, "print the admin API's JSON response instead of readable lines")
	cf.fs.DurationVar(&cf.timeout, "timeout", 30*time.Second, "maximum time for each admin API call")
	if withPlaintext {
		cf.fs.BoolVar(&cf.plaintext, "plaintext", false, `keys set: send the key as {"key":...} over the admin connection instead of encrypting it to the proxy's recipient first`)
	}
	cf.fs.Usage = func() {
		fmt.Fprint(cio.stderr, usage)
		cf.fs.PrintDefaults()
		fmt.Fprint(cio.stderr, clientEnvUsage)
	}
	return cf
}

// parse parses args and returns the positional arguments, or the exit code
// to return at once.
func (cf *clientFlags) parse(args []string) ([]string, int, bool) {
	if err := cf.fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, exitOK, false
		}
		return nil, cf.fail(cf.stderr, usagef("%v", err)), false
	}
	return cf.fs.Args(), 0, true
}

// keysCommand runs "byokproxy keys ..." and returns the exit code.
func keysCommand(args []string, cio cliIO) int {
	cf := newClientFlags("keys", keysUsage, cio, true)
	pos, code, ok := cf.parse(args)
	if !ok {
		return code
	}
	if len(pos) == 0 {
		cf.fs.Usage()
		return exitUsage
	}
	if cf.plaintext && pos[0] != "set" {
		return cf.fail(cio.stderr, usagef("--plaintext applies to \"keys set\" only"))
	}
	var err error
	switch pos[0] {
	case "set":
		err = cf.withClient(cio, func(ctx context.Context, c *adminClient) error { return keysSet(ctx, c, cf, cio, pos[1:]) })
	case "show":
		err = cf.withClient(cio, func(ctx context.Context, c *adminClient) error { return keysShow(ctx, c, cf, cio, pos[1:]) })
	case "rm":
		err = cf.withClient(cio, func(ctx context.Context, c *adminClient) error { return keysRemove(ctx, c, cf, cio, pos[1:]) })
	case "use":
		err = cf.withClient(cio, func(ctx context.Context, c *adminClient) error { return keysUse(ctx, c, cf, cio, pos[1:]) })
	case "test":
		err = cf.withClient(cio, func(ctx context.Context, c *adminClient) error { return keysTest(ctx, c, cf, cio, pos[1:]) })
	default:
		err = usagef("unknown keys command %q: use set, show, rm, use or test", pos[0])
	}
	return cf.fail(cio.stderr, err)
}

// tokenCommand runs "byokproxy token ..." and returns the exit code.
func tokenCommand(args []string, cio cliIO) int {
	cf := newClientFlags("token", tokenUsage, cio, false)
	pos, code, ok := cf.parse(args)
	if !ok {
		return code
	}
	if len(pos) == 0 {
		cf.fs.Usage()
		return exitUsage
	}
	var err error
	switch pos[0] {
	case "issue", "revoke":
		err = cf.withClient(cio, func(ctx context.Context, c *adminClient) error { return tokenIssue(ctx, c, cf, cio, pos[0], pos[1:]) })
	default:
		err = usagef("unknown token command %q: use issue or revoke", pos[0])
	}
	return cf.fail(cio.stderr, err)
}

// fail prints err to stderr and returns its exit code.
func (cf *clientFlags) fail(stderr io.Writer, err error) int {
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(stderr, "byokproxy: %v\n", err)
	var usage *usageError
	if errors.As(err, &usage) {
		fmt.Fprintf(stderr, "Run \"byokproxy %s --help\" for usage.\n", cf.fs.Name())
		return exitUsage
	}
	return exitFailure
}

// withClient builds the admin client from the flags and environment and
// runs fn with it under the call timeout.
func (cf *clientFlags) withClient(cio cliIO, fn func(context.Context, *adminClient) error) error {
	base, err := url.Parse(cf.adminURL)
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return usagef("invalid --admin %q: use the admin listener's URL, such as %s", cf.adminURL, defaultAdminURL)
	}
	token := cio.getenv(envAdminToken)
	if token == "" {
		return fmt.Errorf("%s is not set: export it with the proxy's admin.token", envAdminToken)
	}
	c := &adminClient{
		base:  strings.TrimSuffix(base.String(), "/"),
		token: token,
		http:  &http.Client{Timeout: cf.timeout},
	}
	ctx, cancel := context.WithTimeout(context.Background(), cf.timeout)
	defer cancel()
	return fn(ctx, c)
}

// mailboxArg validates a MAILBOX argument.
func mailboxArg(s string) (mailbox.ID, error) {
	id, err := mailbox.ParseID(s)
	if err != nil {
		return "", usagef("invalid MAILBOX %q: %s", s, mailbox.IDRule)
	}
	return id, nil
}

// providerArg validates a PROVIDER argument.
func providerArg(s string) (*provider.Spec, error) {
	spec := provider.Lookup(s)
	if spec == nil {
		return nil, usagef("invalid PROVIDER %q: use %s", s, strings.Join(provider.Names, ", "))
	}
	return spec, nil
}

// mailboxProviderArgs validates exactly MAILBOX PROVIDER.
func mailboxProviderArgs(cmd string, args []string) (mailbox.ID, *provider.Spec, error) {
	if len(args) != 2 {
		return "", nil, usagef("%s takes MAILBOX PROVIDER, got %d arguments", cmd, len(args))
	}
	id, err := mailboxArg(args[0])
	if err != nil {
		return "", nil, err
	}
	spec, err := providerArg(args[1])
	if err != nil {
		return "", nil, err
	}
	return id, spec, nil
}

func providerPath(id mailbox.ID, prov, rest string) string {
	return mailboxPath(id) + "/providers/" + prov + "/" + rest
}

// mailboxPath returns the admin API path of mailbox id. The ids "." and
// "..", which the id rule allows, get percent-encoded dots, because the
// admin server's router would clean such a segment out of the path.
func mailboxPath(id mailbox.ID) string {
	segment := url.PathEscape(string(id))
	if segment == "." || segment == ".." {
		segment = strings.ReplaceAll(segment, ".", "%2E")
	}
	return "/admin/v1/mailboxes/" + segment
}

func keysSet(ctx context.Context, c *adminClient, cf *clientFlags, cio cliIO, args []string) error {
	if len(args) > 2 {
		return usagef("keys set takes MAILBOX PROVIDER only; never put a key on the command line, where the process list and shell history keep it: pipe it to standard input instead")
	}
	id, spec, err := mailboxProviderArgs("keys set", args)
	if err != nil {
		return err
	}

	// The recipient is fetched first, so a wrong URL or token fails before
	// anyone pastes a key.
	var recipient *age.X25519Recipient
	if !cf.plaintext {
		recipient, err = c.recipient(ctx)
		if err != nil {
			return err
		}
	}
	key, err := readKey(cio, id, spec)
	if err != nil {
		return err
	}
	defer clear(key)

	var body any
	if cf.plaintext {
		body = map[string]string{"key": string(key)}
	} else {
		sealed, err := sealKey(key, recipient)
		if err != nil {
			return err
		}
		body = map[string]string{"age": sealed}
	}
	answer, err := c.call(ctx, http.MethodPut, providerPath(id, spec.Name, "key"), body)
	if err != nil {
		return describeKeyError(err, id, spec)
	}
	if cf.json {
		return printJSON(cio, answer)
	}
	var st keystore.Status
	if err := decodeAnswer(answer, &st); err != nil {
		return err
	}
	fmt.Fprintf(cio.stdout, "%s  %s\n", id, statusLine(spec.Name, st))
	if st.Source != keystore.SourceBYOK {
		fmt.Fprintf(cio.stderr, "The key is stored but not in use: run \"byokproxy keys use %s %s byok\" to use it.\n", id, spec.Name)
	}
	return nil
}

// readKey reads the key from the terminal without echo, or from piped
// standard input, and checks its format before anything is sent.
func readKey(cio cliIO, id mailbox.ID, spec *provider.Spec) ([]byte, error) {
	var raw []byte
	var err error
	if cio.readHidden != nil {
		fmt.Fprintf(cio.stderr, "%s key for %s (input is hidden): ", spec.Title, id)
		raw, err = cio.readHidden()
		if err != nil {
			return nil, fmt.Errorf("reading the key from the terminal failed: %w", err)
		}
	} else {
		raw, err = io.ReadAll(io.LimitReader(cio.stdin, maxKeyInput+1))
		if err != nil {
			return nil, fmt.Errorf("reading the key from standard input failed: %w", err)
		}
		if len(raw) > maxKeyInput {
			clear(raw)
			return nil, fmt.Errorf("standard input contains more than %d bytes: pipe only the key", maxKeyInput)
		}
	}
	key := bytes.TrimSpace(raw)
	if len(key) == 0 {
		return nil, fmt.Errorf("no key on standard input: pipe it in, such as: printf %%s \"$KEY\" | byokproxy keys set %s %s", id, spec.Name)
	}
	if !spec.ValidKey(key) {
		clear(raw)
		return nil, fmt.Errorf("invalid %s key on standard input: %s; nothing was sent", spec.Title, spec.KeyRule)
	}
	return key, nil
}

// sealKey encrypts the bare key to the proxy's recipient, armored, which is
// the form PUT .../key accepts as {"age": ...}.
func sealKey(key []byte, recipient *age.X25519Recipient) (string, error) {
	var out strings.Builder
	aw := armor.NewWriter(&out)
	w, err := age.Encrypt(aw, recipient)
	if err != nil {
		return "", fmt.Errorf("encrypting the key to %s failed: %w", recipient, err)
	}
	if _, err := w.Write(key); err != nil {
		return "", fmt.Errorf("encrypting the key failed: %w", err)
	}
	if err := w.Close(); err != nil {
		return "", fmt.Errorf("encrypting the key failed: %w", err)
	}
	if err := aw.Close(); err != nil {
		return "", fmt.Errorf("encrypting the key failed: %w", err)
	}
	return out.String(), nil
}

func describeKeyError(err error, id mailbox.ID, spec *provider.Spec) error {
	var apiErr *apiError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusBadRequest {
		return fmt.Errorf("the proxy rejected the %s key for %s: %s", spec.Title, id, apiErr.Message)
	}
	return err
}

func keysShow(ctx context.Context, c *adminClient, cf *clientFlags, cio cliIO, args []string) error {
	if len(args) != 1 {
		return usagef("keys show takes MAILBOX, got %d arguments", len(args))
	}
	id, err := mailboxArg(args[0])
	if err != nil {
		return err
	}
	answer, err := c.call(ctx, http.MethodGet, mailboxPath(id), nil)
	if err != nil {
		return err
	}
	if cf.json {
		return printJSON(cio, answer)
	}
	var mb struct {
		Mailbox   string                     `json:"mailbox"`
		Providers map[string]keystore.Status `json:"providers"`
	}
	if err := decodeAnswer(answer, &mb); err != nil {
		return err
	}
	fmt.Fprintf(cio.stdout, "mailbox %s\n", mb.Mailbox)
	for _, p := range provider.Names {
		if st, ok := mb.Providers[p]; ok {
			fmt.Fprintln(cio.stdout, statusLine(p, st))
		}
	}
	return nil
}

func keysRemove(ctx context.Context, c *adminClient, cf *clientFlags, cio cliIO, args []string) error {
	id, spec, err := mailboxProviderArgs("keys rm", args)
	if err != nil {
		return err
	}
	if _, err := c.call(ctx, http.MethodDelete, providerPath(id, spec.Name, "key"), nil); err != nil {
		return err
	}
	if cf.json {
		out, _ := json.Marshal(map[string]any{"mailbox": id, "provider": spec.Name, "removed": true, "source": keystore.SourceShared})
		return printJSON(cio, out)
	}
	fmt.Fprintf(cio.stdout, "%s  %s  removed; source is now shared\n", id, spec.Name)
	return nil
}

func keysUse(ctx context.Context, c *adminClient, cf *clientFlags, cio cliIO, args []string) error {
	if len(args) != 3 {
		return usagef("keys use takes MAILBOX PROVIDER shared|byok, got %d arguments", len(args))
	}
	id, spec, err := mailboxProviderArgs("keys use", args[:2])
	if err != nil {
		return err
	}
	source := args[2]
	if source != keystore.SourceShared && source != keystore.SourceBYOK {
		return usagef("invalid source %q: use shared or byok", source)
	}
	answer, err := c.call(ctx, http.MethodPut, providerPath(id, spec.Name, "source"), map[string]string{"source": source})
	var apiErr *apiError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusConflict {
		return fmt.Errorf("no %s key is stored for %s: run \"byokproxy keys set %s %s\" first", spec.Title, id, id, spec.Name)
	}
	if err != nil {
		return err
	}
	if cf.json {
		return printJSON(cio, answer)
	}
	var st keystore.Status
	if err := decodeAnswer(answer, &st); err != nil {
		return err
	}
	fmt.Fprintf(cio.stdout, "%s  %s\n", id, statusLine(spec.Name, st))
	return nil
}

func keysTest(ctx context.Context, c *adminClient, cf *clientFlags, cio cliIO, args []string) error {
	id, spec, err := mailboxProviderArgs("keys test", args)
	if err != nil {
		return err
	}
	answer, err := c.call(ctx, http.MethodPost, providerPath(id, spec.Name, "test"), nil)
	var apiErr *apiError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusConflict {
		return fmt.Errorf("no %s key is stored for %s: run \"byokproxy keys set %s %s\" first", spec.Title, id, id, spec.Name)
	}
	if err != nil {
		return err
	}

	var result struct {
		OK     bool   `json:"ok"`
		Status int    `json:"status"`
		Error  string `json:"error"`
	}
	if err := decodeAnswer(answer, &result); err != nil {
		return err
	}
	if cf.json {
		if err := printJSON(cio, answer); err != nil {
			return err
		}
	} else if result.OK {
		fmt.Fprintf(cio.stdout, "%s  %s  key works (status %d)\n", id, spec.Name, result.Status)
	}
	if result.OK {
		return nil
	}

	if result.Status == 0 {
		return fmt.Errorf("the %s key test for %s got no response from %s: %s", spec.Name, id, spec.Title, result.Error)
	}
	return fmt.Errorf("the %s key test for %s failed: %s returned status %d: %s", spec.Name, id, spec.Title, result.Status, result.Error)
}

func tokenIssue(ctx context.Context, c *adminClient, cf *clientFlags, cio cliIO, action string, args []string) error {
	if len(args) != 1 {
		return usagef("token %s takes MAILBOX, got %d arguments", action, len(args))
	}
	id, err := mailboxArg(args[0])
	if err != nil {
		return err
	}
	path := mailboxPath(id) + "/token"
	if action == "revoke" {
		path += "/revoke"
	}
	answer, err := c.call(ctx, http.MethodPost, path, nil)
	if err != nil {
		return err
	}
	if cf.json {
		return printJSON(cio, answer)
	}
	var tok struct {
		Token string `json:"token"`
	}
	if err := decodeAnswer(answer, &tok); err != nil {
		return err
	}
	fmt.Fprintln(cio.stdout, tok.Token)
	if action == "revoke" {
		fmt.Fprintf(cio.stderr, "Every earlier token of %s is revoked; the token above is its new one.\n", id)
	}
	return nil
}

// statusLine renders one provider's status, such as
// "openai     byok    key …abcd  updated 2026-12-04T17:00:00Z".
func statusLine(prov string, st keystore.Status) string {
	line := fmt.Sprintf("%-9s  %-6s  ", prov, st.Source)
	if !st.HasKey {
		return line + "no key"
	}
	line += "key …" + st.Last4
	if st.UpdatedAt != nil {
		line += "  updated " + st.UpdatedAt.UTC().Format(time.RFC3339)
	}
	return line
}

func printJSON(cio cliIO, data []byte) error {
	_, err := fmt.Fprintf(cio.stdout, "%s\n", bytes.TrimSpace(data))
	return err
}

func decodeAnswer(data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("the admin API returned a body that is not the expected JSON: %w", err)
	}
	return nil
}

// adminClient calls the admin API.
type adminClient struct {
	base  string
	token string
	http  *http.Client
}

// apiError is an error status from the admin API, with its message.
type apiError struct {
	Status  int
	Message string
	// Hint is the next step for the user.
	Hint string
}

func (e *apiError) Error() string {
	msg := fmt.Sprintf("the admin API returned status %d", e.Status)
	if e.Message != "" {
		msg += ": " + e.Message
	}
	if e.Hint != "" {
		msg += "; " + e.Hint
	}
	return msg
}

// call sends one admin request and returns the body of a 2xx response.
func (c *adminClient) call(ctx context.Context, method, path string, body any) ([]byte, error) {
	var reader io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encoding the request failed: %w", err)
		}
		reader = bytes.NewReader(data)
		defer clear(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, reader)
	if err != nil {
		return nil, fmt.Errorf("building the request failed: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}

	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.transportError(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("reading the admin API's response from %s failed: %w", c.base, err)
	}
	if resp.StatusCode/100 == 2 {
		return data, nil
	}
	return nil, c.statusError(resp.StatusCode, data, method, path)
}

func (c *adminClient) transportError(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("the admin API at %s did not respond in time: %w; check that the proxy is running, or raise --timeout", c.base, err)
	}
	return fmt.Errorf("cannot reach the admin API at %s: %w; check that the proxy is running and that --admin or %s names its admin.listen address", c.base, err, envAdminURL)
}

func (c *adminClient) statusError(status int, data []byte, method, path string) error {
	var shape struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	e := &apiError{Status: status}
	if json.Unmarshal(data, &shape) == nil {
		e.Message = shape.Error.Message
	}
	switch status {
	case http.StatusUnauthorized:
		return fmt.Errorf("the admin API rejected the token: set %s to the proxy's admin.token", envAdminToken)
	case http.StatusNotFound:
		e.Message = ""
		e.Hint = fmt.Sprintf("%s has no admin endpoint %s %s; check that --admin names the admin listener (admin.listen), not the proxy listener", c.base, method, path)
	case http.StatusServiceUnavailable:
		e.Hint = "the proxy cannot reach its Redis server; retry once it is back"
	case http.StatusInternalServerError:
		e.Hint = "see the proxy's log"
	}
	return e
}

// recipient fetches the proxy's age recipient.
func (c *adminClient) recipient(ctx context.Context) (*age.X25519Recipient, error) {
	answer, err := c.call(ctx, http.MethodGet, "/admin/v1/recipient", nil)
	if err != nil {
		return nil, err
	}
	var body struct {
		Recipient string `json:"recipient"`
	}
	if err := decodeAnswer(answer, &body); err != nil {
		return nil, err
	}
	r, err := age.ParseX25519Recipient(body.Recipient)
	if err != nil {
		return nil, fmt.Errorf("the admin API returned an invalid recipient %q: %w", body.Recipient, err)
	}
	return r, nil
}

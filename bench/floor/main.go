// Command floor is the baseline of the benchmarks: the least any Go reverse
// proxy in front of a provider can cost. It is a bare httputil.ReverseProxy
// that replaces the client's Authorization header with a fixed key, flushes
// every write (FlushInterval -1) and uses a Transport that keeps enough idle
// connections. It reads no body, checks no token and records nothing.
//
// With -full-duplex=false it leaves the HTTP/1 server's default in place,
// which closes the request body once the response header is written. The
// streams-cut measurement uses that mode.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "`address` to serve on")
	upstream := flag.String("upstream", "", "upstream base `URL`, such as http://127.0.0.1:9000")
	key := flag.String("key", "", "provider key sent as Authorization: Bearer KEY")
	caFile := flag.String("ca-file", "", "PEM `file` of an extra CA trusted for an https upstream")
	fullDuplex := flag.Bool("full-duplex", true, "turn on http.ResponseController.EnableFullDuplex for each request")
	flag.Parse()

	target, err := url.Parse(*upstream)
	if err != nil || target.Host == "" {
		fail(fmt.Sprintf("invalid -upstream %q", *upstream))
	}
	transport, err := newTransport(*caFile)
	if err != nil {
		fail(err.Error())
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(err.Error())
	}
	srv := &http.Server{
		Handler:           newHandler(target, *key, *fullDuplex, transport),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          stdlog.New(os.Stderr, "floor: ", 0),
	}
	fmt.Printf("http %s\n", ln.Addr())
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "floor:", msg)
	os.Exit(1)
}

// newHandler returns the floor proxy to target.
func newHandler(target *url.URL, key string, fullDuplex bool, transport http.RoundTripper) http.Handler {
	auth := "Bearer " + key
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Header.Set("Authorization", auth)
		},
		Transport:     transport,
		FlushInterval: -1,
		ErrorLog:      slog.NewLogLogger(slog.DiscardHandler, slog.LevelError),
	}
	if !fullDuplex {
		return rp
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).EnableFullDuplex()
		rp.ServeHTTP(w, r)
	})
}

// newTransport returns the Transport that byokproxy also uses: many idle
// connections per host, HTTP/2 over TLS when the upstream offers it.
func newTransport(caFile string) (*http.Transport, error) {
	t := &http.Transport{
		Proxy: nil,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   512,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no PEM certificate in %s", caFile)
		}
		t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return t, nil
}

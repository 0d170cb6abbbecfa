package main

import (
	"fmt"
	"net/http"
	"time"

	"github.com/spf13/pflag"
)

// healthcheck probes a running proxy, for container health checks in images
// that have no shell or curl.
func healthcheck(args []string) error {
	fs := pflag.NewFlagSet("healthcheck", pflag.ContinueOnError)
	url := fs.String("url", "http://127.0.0.1:8080/healthz", "URL that must answer 200")
	timeout := fs.Duration("timeout", 3*time.Second, "how long to wait for the answer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	client := &http.Client{Timeout: *timeout}
	resp, err := client.Get(*url)
	if err != nil {
		return fmt.Errorf("health check failed: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("health check failed: %s returned status %d", *url, resp.StatusCode)
	}
	return nil
}

package main

import (
	"strings"
	"testing"

	"github.com/byokproxy/byokproxy/config"
)

func TestDevBannerListsForwardProxy(t *testing.T) {
	cfg := config.Defaults()
	cfg.Dev = true
	cfg.Admin.Token = "dev-admin-token"

	var without strings.Builder
	printDevBanner(&without, cfg, "")
	if !strings.Contains(without.String(), "dev-admin-token") {
		t.Errorf("banner lacks the admin token:\n%s", without.String())
	}
	if strings.Contains(without.String(), "forward proxy") {
		t.Errorf("banner lists a forward proxy that is off:\n%s", without.String())
	}

	cfg.Forward.Listen = "127.0.0.1:8443"
	var with strings.Builder
	printDevBanner(&with, cfg, "/tmp/dev-ca.pem")
	if !strings.Contains(with.String(), "forward proxy: http://127.0.0.1:8443 (its CA certificate: /tmp/dev-ca.pem)") {
		t.Errorf("banner lacks the forward proxy and its CA file:\n%s", with.String())
	}
}

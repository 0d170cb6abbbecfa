// Package deploy holds deployment material: Kubernetes manifests, a
// Prometheus scrape configuration and alert rules, and a Grafana dashboard.
// Its tests parse every file, check the manifests against each other and
// against config.Load, and check that every PromQL expression names only
// metrics and labels that byokproxy exports.
package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"

	"github.com/byokproxy/byokproxy/config"
	"github.com/byokproxy/byokproxy/keystore"
	"github.com/byokproxy/byokproxy/metrics"
)

// object is one decoded YAML or JSON mapping.
type object = map[string]any

// manifest is one Kubernetes object and the file it came from.
type manifest struct {
	file string
	obj  object
}

// get walks obj along keys and returns the value there, or nil.
func get(obj any, keys ...string) any {
	for _, k := range keys {
		m, ok := obj.(object)
		if !ok {
			return nil
		}
		obj = m[k]
	}
	return obj
}

func getString(obj any, keys ...string) string {
	s, _ := get(obj, keys...).(string)
	return s
}

func getList(obj any, keys ...string) []any {
	l, _ := get(obj, keys...).([]any)
	return l
}

// loadManifests decodes every document of every YAML file under kubernetes/.
func loadManifests(t *testing.T) []manifest {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("kubernetes", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no YAML files in kubernetes/: %v", err)
	}
	var out []manifest
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for i := 0; ; i++ {
			var obj object
			err := dec.Decode(&obj)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s document %d: %v", file, i, err)
			}
			if obj == nil {
				continue
			}
			out = append(out, manifest{file: file, obj: obj})
		}
	}
	return out
}

// apiVersions maps each kind the manifests may use to its API version.
var apiVersions = map[string]string{
	"ConfigMap":           "v1",
	"Service":             "v1",
	"Deployment":          "apps/v1",
	"PodDisruptionBudget": "policy/v1",
	"NetworkPolicy":       "networking.k8s.io/v1",
}

func TestManifestsParse(t *testing.T) {
	seen := map[string]string{}
	kinds := map[string]int{}
	for _, m := range loadManifests(t) {
		kind, name := getString(m.obj, "kind"), getString(m.obj, "metadata", "name")
		if kind == "" || name == "" {
			t.Errorf("%s: object without kind or metadata.name: %v", m.file, m.obj)
			continue
		}
		kinds[kind]++
		want, ok := apiVersions[kind]
		if !ok {
			t.Errorf("%s: %s/%s: unexpected kind", m.file, kind, name)
		} else if got := getString(m.obj, "apiVersion"); got != want {
			t.Errorf("%s: %s/%s: apiVersion %q, want %q", m.file, kind, name, got, want)
		}
		if other, dup := seen[kind+"/"+name]; dup {
			t.Errorf("%s: %s/%s is also defined in %s", m.file, kind, name, other)
		}
		seen[kind+"/"+name] = m.file
	}
	for _, kind := range []string{"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} {
		if kinds[kind] == 0 {
			t.Errorf("no %s in kubernetes/", kind)
		}
	}
}

// byokproxyContainer returns the container named byokproxy of a Deployment,
// a regular container or a native sidecar among the init containers.
func byokproxyContainer(deployment object) (c object, sidecar bool) {
	for _, list := range []string{"containers", "initContainers"} {
		for _, c := range getList(deployment, "spec", "template", "spec", list) {
			if getString(c, "name") == "byokproxy" {
				return c.(object), list == "initContainers"
			}
		}
	}
	return nil, false
}

// labelsMatch reports whether every selector label is in labels.
func labelsMatch(selector, labels any) bool {
	sel, _ := selector.(object)
	lab, _ := labels.(object)
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if lab[k] != v {
			return false
		}
	}
	return true
}

func TestDeployments(t *testing.T) {
	manifests := loadManifests(t)
	byKind := map[string][]manifest{}
	for _, m := range manifests {
		byKind[getString(m.obj, "kind")] = append(byKind[getString(m.obj, "kind")], m)
	}
	if len(byKind["Deployment"]) == 0 {
		t.Fatal("no Deployment")
	}
	for _, d := range byKind["Deployment"] {
		name := getString(d.obj, "metadata", "name")
		t.Run(name, func(t *testing.T) {
			checkDeployment(t, d, byKind)
		})
	}
	for _, kind := range []string{"Service", "PodDisruptionBudget", "NetworkPolicy"} {
		for _, m := range byKind[kind] {
			selector := get(m.obj, "spec", "selector")
			if kind != "Service" {
				selector = get(m.obj, "spec", "selector", "matchLabels")
			}
			if kind == "NetworkPolicy" {
				selector = get(m.obj, "spec", "podSelector", "matchLabels")
			}
			matched := false
			for _, d := range byKind["Deployment"] {
				if d.file == m.file && labelsMatch(selector, get(d.obj, "spec", "template", "metadata", "labels")) {
					matched = true
				}
			}
			if !matched {
				t.Errorf("%s: %s/%s selects no pod of a Deployment in the same file", m.file, kind, getString(m.obj, "metadata", "name"))
			}
		}
	}
}

func checkDeployment(t *testing.T, d manifest, byKind map[string][]manifest) {
	pod := get(d.obj, "spec", "template")
	if !labelsMatch(get(d.obj, "spec", "selector", "matchLabels"), get(pod, "metadata", "labels")) {
		t.Error("spec.selector.matchLabels does not match the pod template's labels")
	}
	c, sidecar := byokproxyContainer(d.obj)
	if c == nil {
		t.Fatal("no container named byokproxy")
	}
	if sidecar {
		// An init container without restartPolicy Always would have to
		// exit before the application starts.
		if getString(c, "restartPolicy") != "Always" {
			t.Error("byokproxy init container: restartPolicy is not Always, so it is not a sidecar")
		}
	}

	for _, key := range [][]string{
		{"securityContext", "readOnlyRootFilesystem"},
		{"securityContext", "runAsNonRoot"},
	} {
		if get(c, key...) != true {
			t.Errorf("byokproxy container: %s is not true", strings.Join(key, "."))
		}
	}
	if get(c, "securityContext", "allowPrivilegeEscalation") != false {
		t.Error("byokproxy container: securityContext.allowPrivilegeEscalation is not false")
	}
	if !slices.Contains(getList(c, "securityContext", "capabilities", "drop"), any("ALL")) {
		t.Error("byokproxy container: capabilities do not drop ALL")
	}
	for _, key := range [][]string{{"requests", "cpu"}, {"requests", "memory"}, {"limits", "memory"}} {
		if get(c, append([]string{"resources"}, key...)...) == nil {
			t.Errorf("byokproxy container: resources.%s missing", strings.Join(key, "."))
		}
	}
	annotations, _ := get(pod, "metadata", "annotations").(object)
	if annotations["prometheus.io/scrape"] != "true" || annotations["prometheus.io/path"] != "/metrics" {
		t.Errorf("pod annotations %v: want prometheus.io/scrape \"true\" and prometheus.io/path /metrics", annotations)
	}

	// Volumes: every mount names a volume, every ConfigMap volume names a
	// ConfigMap of the same file.
	volumes := map[string]object{}
	for _, v := range getList(pod, "spec", "volumes") {
		volumes[getString(v, "name")] = v.(object)
	}
	mounts := map[string]object{}
	for _, mnt := range getList(c, "volumeMounts") {
		name := getString(mnt, "name")
		mounts[name] = mnt.(object)
		if volumes[name] == nil {
			t.Errorf("volumeMount %s names no volume", name)
		}
		if get(mnt, "subPath") != nil {
			t.Errorf("volumeMount %s uses subPath, which stops updates from reaching the file", name)
		}
	}

	cfg, cfgFile := loadContainerConfig(t, d, c, volumes, mounts, byKind["ConfigMap"])

	if port := annotations["prometheus.io/port"]; port != portOf(t, cfg.Metrics.Listen) {
		t.Errorf("prometheus.io/port %v, but metrics.listen in %s is %s", port, cfgFile, cfg.Metrics.Listen)
	}
	hasMetricsPort := false
	for _, p := range getList(c, "ports") {
		if getString(p, "name") == "metrics" && fmt.Sprint(get(p, "containerPort")) == portOf(t, cfg.Metrics.Listen) {
			hasMetricsPort = true
		}
	}
	if !hasMetricsPort {
		t.Errorf("no container port named metrics on %s, which the scrape job in prometheus/scrape.yml selects", cfg.Metrics.Listen)
	}
	checkProbe(t, c, "livenessProbe", "/healthz", cfg.Listen)
	checkProbe(t, c, "readinessProbe", "/readyz", cfg.Listen)
	if sidecar {
		checkProbe(t, c, "startupProbe", "/healthz", cfg.Listen)
	}

	// The preStop sleep, the grace of the proxy, the second it gives the
	// streams it cuts then to record themselves, and its audit flush, which
	// serve bounds by max(shutdown_grace/2, 5s), all run within the pod's
	// termination grace period.
	sleep, _ := get(c, "lifecycle", "preStop", "sleep", "seconds").(int)
	shutdown := time.Duration(sleep)*time.Second + cfg.ShutdownGrace + time.Second + max(cfg.ShutdownGrace/2, 5*time.Second)
	grace, ok := get(pod, "spec", "terminationGracePeriodSeconds").(int)
	if !ok || time.Duration(grace)*time.Second <= shutdown {
		t.Errorf("terminationGracePeriodSeconds %v is not longer than the preStop sleep, shutdown_grace and audit flush (%v)",
			get(pod, "spec", "terminationGracePeriodSeconds"), shutdown)
	}
}

// checkProbe checks that a probe requests path on the proxy listener, by
// HTTP on a container port or by running "byokproxy healthcheck".
func checkProbe(t *testing.T, c object, probe, path, listen string) {
	t.Helper()
	p := get(c, probe)
	if p == nil {
		t.Errorf("%s missing", probe)
		return
	}
	if get(p, "httpGet") != nil {
		if got := getString(p, "httpGet", "path"); got != path {
			t.Errorf("%s path %q, want %s", probe, got, path)
		}
		port := fmt.Sprint(get(p, "httpGet", "port"))
		for _, cp := range getList(c, "ports") {
			if getString(cp, "name") == port {
				port = fmt.Sprint(get(cp, "containerPort"))
			}
		}
		if port != portOf(t, listen) {
			t.Errorf("%s port %s, but listen is %s", probe, port, listen)
		}
		return
	}
	cmd := getList(p, "exec", "command")
	want := []any{"/byokproxy", "healthcheck", "--url", "http://" + listen + path}
	if !slices.Equal(cmd, want) {
		t.Errorf("%s command %v, want %v", probe, cmd, want)
	}
}

func portOf(t *testing.T, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return port
}

// loadContainerConfig loads the byokproxy config of container c with
// config.Load as the container would, with the file from its ConfigMap and
// the environment from its env list. Every file path under a Secret mount
// points at a temporary file with a valid value instead. It fails the test
// when the config names a Secret file that the volume does not project.
func loadContainerConfig(t *testing.T, d manifest, c object, volumes, mounts map[string]object, configMaps []manifest) (*config.Config, string) {
	t.Helper()
	args := getList(c, "args")
	i := slices.Index(args, any("--config"))
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("container args %v have no --config FILE", args)
	}
	configPath := args[i+1].(string)

	// Find the ConfigMap key behind configPath.
	var text string
	for name, mnt := range mounts {
		dir := getString(mnt, "mountPath")
		rel, ok := strings.CutPrefix(configPath, dir+"/")
		cmName := getString(volumes[name], "configMap", "name")
		if !ok || cmName == "" {
			continue
		}
		for _, cm := range configMaps {
			if cm.file == d.file && getString(cm.obj, "metadata", "name") == cmName {
				text = getString(cm.obj, "data", rel)
			}
		}
		if text == "" {
			t.Fatalf("ConfigMap %s in %s has no key %s for %s", cmName, d.file, rel, configPath)
		}
	}
	if text == "" {
		t.Fatalf("no ConfigMap volume is mounted at the directory of %s", configPath)
	}

	// Replace every path under a Secret mount by a temporary file.
	tmp := t.TempDir()
	for name, mnt := range mounts {
		secret := get(volumes[name], "secret")
		if secret == nil {
			continue
		}
		dir := getString(mnt, "mountPath") + "/"
		projected := map[string]bool{}
		for _, item := range getList(secret, "items") {
			projected[getString(item, "path")] = true
		}
		for _, ref := range regexp.MustCompile(regexp.QuoteMeta(dir)+`[A-Za-z0-9._-]+`).FindAllString(text, -1) {
			file := strings.TrimPrefix(ref, dir)
			if getList(secret, "items") != nil && !projected[file] {
				t.Errorf("the config reads %s, but the Secret volume %s does not project %s", ref, name, file)
			}
			local := filepath.Join(tmp, file)
			if err := os.WriteFile(local, []byte(secretFileContent(t, file)), 0o600); err != nil {
				t.Fatal(err)
			}
			text = strings.ReplaceAll(text, ref, local)
		}
	}
	configFile := filepath.Join(tmp, "config.yaml")
	if err := os.WriteFile(configFile, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}

	var env []string
	for _, e := range getList(c, "env") {
		value := getString(e, "value")
		if get(e, "valueFrom", "secretKeyRef") != nil {
			value = "secret-from-kubernetes-0123456789"
		}
		env = append(env, getString(e, "name")+"="+value)
	}
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	config.RegisterFlags(fs)
	if err := fs.Parse([]string{"--config", configFile}); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(fs, env)
	if err != nil {
		t.Fatalf("config.Load of %s from %s:\n%v", configPath, d.file, err)
	}
	return cfg, configPath
}

// secretFileContent returns a valid value for a Secret file the config names.
func secretFileContent(t *testing.T, name string) string {
	t.Helper()
	switch {
	case strings.HasPrefix(name, "identity"):
		ids, err := keystore.GenerateIdentities()
		if err != nil {
			t.Fatal(err)
		}
		return ids.SecretText() + "\n"
	case strings.HasPrefix(name, "anthropic"):
		return "sk-ant-api03-" + strings.Repeat("a", 48) + "\n"
	case strings.HasPrefix(name, "openai"):
		return "sk-proj-" + strings.Repeat("o", 40) + "\n"
	case strings.HasPrefix(name, "google"):
		return "AIza" + strings.Repeat("g", 35) + "\n"
	}
	return "secret-file-content-0123456789\n"
}

// exported is what byokproxy's /metrics carries: metric names and the labels
// of each.
type exported map[string][]string

// exportedMetrics registers byokproxy's collectors, gives every vector one
// child, and returns the series names Prometheus would store, with histogram
// suffixes and the "up" series of every target. targetLabels are added to
// each.
func exportedMetrics(t *testing.T, targetLabels []string) exported {
	t.Helper()
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	m.Requests.WithLabelValues("openai", "byok", "200").Inc()
	m.Tokens.WithLabelValues("openai", "byok", "input").Inc()
	m.Duration.WithLabelValues("openai", "byok").Observe(1)
	m.UpstreamTTFB.WithLabelValues("openai").Observe(1)
	m.InFlight.WithLabelValues("openai").Inc()
	m.KeyErrors.WithLabelValues("openai", metrics.ReasonNoKey).Inc()
	m.MeteredRejections.WithLabelValues("openai").Inc()
	m.AuditDropped.Inc()

	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := exported{"up": slices.Clone(targetLabels)}
	for _, f := range families {
		var labels []string
		if len(f.GetMetric()) > 0 {
			for _, l := range f.GetMetric()[0].GetLabel() {
				labels = append(labels, l.GetName())
			}
		}
		labels = append(labels, targetLabels...)
		out[f.GetName()] = labels
		if f.GetType() == dto.MetricType_HISTOGRAM {
			out[f.GetName()+"_bucket"] = append(slices.Clone(labels), "le")
			out[f.GetName()+"_sum"] = labels
			out[f.GetName()+"_count"] = labels
		}
	}
	if runtime.GOOS != "linux" {
		// The process collector reports memory on Linux only.
		out["process_resident_memory_bytes"] = targetLabels
	}
	return out
}

var (
	stringLiteral = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'`)
	metricName    = regexp.MustCompile(`\b(?:byokproxy|go|process)_[a-zA-Z0-9_:]+|\bup\b`)
	selector      = regexp.MustCompile(`([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}`)
	matcherLabel  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	grouping      = regexp.MustCompile(`\b(?:by|without|on|ignoring)\s*\(([^)]*)\)`)
)

// checkExpr reports every metric in expr that byokproxy does not export and
// every label that the metrics it uses do not carry.
func checkExpr(t *testing.T, where, expr string, known exported) {
	t.Helper()
	bare := stringLiteral.ReplaceAllString(expr, `""`)
	if strings.Count(bare, "(") != strings.Count(bare, ")") || strings.Count(bare, "{") != strings.Count(bare, "}") {
		t.Errorf("%s: unbalanced brackets in %q", where, expr)
	}
	used := map[string]bool{}
	allLabels := map[string]bool{}
	for _, name := range metricName.FindAllString(bare, -1) {
		labels, ok := known[name]
		if !ok {
			t.Errorf("%s: metric %s is not exported by byokproxy", where, name)
			continue
		}
		used[name] = true
		for _, l := range labels {
			allLabels[l] = true
		}
	}
	if len(used) == 0 {
		t.Errorf("%s: no byokproxy metric in %q", where, expr)
	}
	for _, m := range selector.FindAllStringSubmatch(bare, -1) {
		labels, ok := known[m[1]]
		if !ok {
			continue
		}
		for _, lm := range matcherLabel.FindAllStringSubmatch(m[2], -1) {
			if !slices.Contains(labels, lm[1]) {
				t.Errorf("%s: %s has no label %q", where, m[1], lm[1])
			}
		}
	}
	for _, g := range grouping.FindAllStringSubmatch(bare, -1) {
		for l := range strings.SplitSeq(g[1], ",") {
			if l = strings.TrimSpace(l); l != "" && !allLabels[l] {
				t.Errorf("%s: grouping label %q is on none of the metrics of %q", where, l, expr)
			}
		}
	}
}

// scrapeConfig is the part of prometheus/scrape.yml the tests read.
type scrapeConfig struct {
	RuleFiles     []string `yaml:"rule_files"`
	ScrapeConfigs []struct {
		JobName        string `yaml:"job_name"`
		MetricsPath    string `yaml:"metrics_path"`
		RelabelConfigs []struct {
			TargetLabel string `yaml:"target_label"`
		} `yaml:"relabel_configs"`
	} `yaml:"scrape_configs"`
}

// targetLabels returns the labels Prometheus adds to every series of the
// byokproxy job: job, instance and those its relabeling sets.
func targetLabels(t *testing.T) []string {
	t.Helper()
	var sc scrapeConfig
	readYAML(t, filepath.Join("prometheus", "scrape.yml"), &sc)
	labels := []string{"job", "instance"}
	for _, job := range sc.ScrapeConfigs {
		if job.JobName != "byokproxy" {
			continue
		}
		for _, r := range job.RelabelConfigs {
			if r.TargetLabel != "" && !strings.HasPrefix(r.TargetLabel, "__") {
				labels = append(labels, r.TargetLabel)
			}
		}
	}
	return labels
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func TestScrapeConfig(t *testing.T) {
	var sc scrapeConfig
	readYAML(t, filepath.Join("prometheus", "scrape.yml"), &sc)
	found := false
	for _, job := range sc.ScrapeConfigs {
		if job.JobName == "byokproxy" {
			found = true
			if job.MetricsPath != "/metrics" {
				t.Errorf("job byokproxy: metrics_path %q, want /metrics", job.MetricsPath)
			}
		}
	}
	if !found {
		t.Error("no scrape job named byokproxy, which the alert rules select")
	}
	for _, f := range sc.RuleFiles {
		if _, err := os.Stat(filepath.Join("prometheus", f)); err != nil {
			t.Errorf("rule file %s: %v", f, err)
		}
	}
}

// alertRules is prometheus/alerts.yml.
type alertRules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func TestAlertRules(t *testing.T) {
	known := exportedMetrics(t, targetLabels(t))
	var rules alertRules
	readYAML(t, filepath.Join("prometheus", "alerts.yml"), &rules)
	names := map[string]bool{}
	covered := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" {
				t.Errorf("group %s: rule without alert name or expr: %+v", g.Name, r)
				continue
			}
			if names[r.Alert] {
				t.Errorf("alert %s defined twice", r.Alert)
			}
			names[r.Alert] = true
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("%s: severity %q, want critical or warning", r.Alert, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: summary or description missing", r.Alert)
			}
			if r.For != "" {
				if _, err := time.ParseDuration(r.For); err != nil {
					t.Errorf("%s: for %q: %v", r.Alert, r.For, err)
				}
			}
			checkExpr(t, "alert "+r.Alert, r.Expr, known)
			for _, name := range metricName.FindAllString(r.Expr, -1) {
				covered[strings.TrimSuffix(name, "_bucket")] = true
			}
		}
	}
	for _, m := range []string{"up", "byokproxy_requests_total", "byokproxy_key_errors_total",
		"byokproxy_audit_events_dropped_total", "byokproxy_metered_rejections_total"} {
		if !covered[m] {
			t.Errorf("no alert uses %s", m)
		}
	}

	// promtool is optional: Debian ships it in the prometheus package.
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not on PATH; skipping promtool check rules and test rules")
		return
	}
	for _, args := range [][]string{{"check", "rules", "alerts.yml"}, {"test", "rules", "alerts_test.yml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "prometheus"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// dashboardPanel is one panel of the Grafana dashboard.
type dashboardPanel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	GridPos struct{ H, W, X, Y int } `json:"gridPos"`
}

func TestDashboard(t *testing.T) {
	known := exportedMetrics(t, targetLabels(t))
	data, err := os.ReadFile(filepath.Join("grafana", "byokproxy.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID        string           `json:"uid"`
		Title      string           `json:"title"`
		Panels     []dashboardPanel `json:"panels"`
		Templating struct {
			List []struct {
				Name string `json:"name"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("grafana/byokproxy.json: %v", err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Error("dashboard without uid or title")
	}
	variables := map[string]bool{"__rate_interval": true}
	for _, v := range dash.Templating.List {
		variables[v.Name] = true
	}

	ids := map[int]bool{}
	var exprs []string
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: gridPos %+v outside the 24 columns", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, target := range p.Targets {
			checkExpr(t, "panel "+p.Title, target.Expr, known)
			for _, v := range regexp.MustCompile(`\$(\w+)`).FindAllStringSubmatch(target.Expr, -1) {
				if !variables[v[1]] {
					t.Errorf("panel %q: variable $%s is not defined", p.Title, v[1])
				}
			}
			exprs = append(exprs, target.Expr)
		}
	}
	all := strings.Join(exprs, "\n")
	for _, want := range []string{
		"byokproxy_requests_total", "byokproxy_tokens_total", "byokproxy_in_flight_requests",
		"byokproxy_key_errors_total", "byokproxy_metered_rejections_total", "byokproxy_audit_events_dropped_total",
		"histogram_quantile(0.99, sum by (le, provider) (rate(byokproxy_request_duration_seconds_bucket",
		"histogram_quantile(0.99, sum by (le, provider) (rate(byokproxy_upstream_ttfb_seconds_bucket",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no panel queries %s", want)
		}
	}

	// promtool parses PromQL when it checks a rule file, so the panel
	// queries become recording rules with the variables filled in.
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not on PATH; skipping the PromQL syntax check of the panels")
		return
	}
	replacer := strings.NewReplacer("$__rate_interval", "5m", "$job", "byokproxy", "$instance", ".*", "$provider", ".*")
	var rules []map[string]string
	for i, e := range exprs {
		rules = append(rules, map[string]string{"record": "panel_query_" + strconv.Itoa(i), "expr": replacer.Replace(e)})
	}
	file := filepath.Join(t.TempDir(), "panels.yml")
	out, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "panels", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, out, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", file).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules on the panel queries: %v\n%s", err, out)
	}
}

// TestEveryFileChecked fails when a file under deploy/ is not read by one of
// the tests above, so a new file gets a check too.
func TestEveryFileChecked(t *testing.T) {
	checked := map[string]bool{
		"deploy_test.go":             true,
		"prometheus/scrape.yml":      true,
		"prometheus/alerts.yml":      true,
		"prometheus/alerts_test.yml": true,
		"grafana/byokproxy.json":     true,
		"kubernetes/sidecar.yaml":    true,
		"kubernetes/shared.yaml":     true,
	}
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if strings.HasPrefix(path, "kubernetes/") && strings.HasSuffix(path, ".yaml") {
			return nil
		}
		if !checked[filepath.ToSlash(path)] {
			t.Errorf("%s is not checked by any test in deploy_test.go", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Package deploy_test checks the Kubernetes manifests under deploy/ and the
// Grafana dashboard against the proxy they describe: every manifest decodes
// into the Kubernetes API types with unknown fields refused, the pods keep
// the security properties the README promises, every RLSPROXY_* variable is
// a flag of `rlsproxy serve`, and every series the dashboard queries is one
// the proxy exports.
package deploy_test

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// image is the repository every rlsproxy container runs (built from the
// Dockerfile).
const image = "ghcr.io/rlsproxy/rlsproxy"

// nonroot is the uid and gid of the distroless nonroot image.
const nonroot = 65532

// kinds are the manifest kinds deploy/ may hold, by "apiVersion kind". A
// document of any other kind fails the test: its fields would go unchecked.
var kinds = map[string]func() any{
	"apps/v1 Deployment":            func() any { return new(appsv1.Deployment) },
	"v1 Service":                    func() any { return new(corev1.Service) },
	"v1 ConfigMap":                  func() any { return new(corev1.ConfigMap) },
	"policy/v1 PodDisruptionBudget": func() any { return new(policyv1.PodDisruptionBudget) },
}

// docSeparator splits a multi-document YAML file.
var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*(?:#.*)?$`)

// decode decodes one YAML document into its Kubernetes API type, refusing
// duplicate keys and unknown or mis-cased fields (sigs.k8s.io/json is the
// strict, case-sensitive decoder the API server uses). It returns nil, nil
// for a document with nothing in it (comments only).
func decode(doc []byte) (any, error) {
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, err
	}
	if string(bytes.TrimSpace(js)) == "null" {
		return nil, nil
	}
	var tm metav1.TypeMeta
	if err := kjson.UnmarshalCaseSensitivePreserveInts(js, &tm); err != nil {
		return nil, err
	}
	newObj, ok := kinds[tm.APIVersion+" "+tm.Kind]
	if !ok {
		return nil, fmt.Errorf("apiVersion %q kind %q: not a kind this test knows (add it to kinds)", tm.APIVersion, tm.Kind)
	}
	obj := newObj()
	strict, err := kjson.UnmarshalStrict(js, obj)
	if err != nil {
		return nil, err
	}
	if len(strict) > 0 {
		return nil, errors.Join(strict...)
	}
	return obj, nil
}

// manifestSet is the manifests of one directory (sidecar, standalone).
type manifestSet struct {
	dir         string
	deployments []*appsv1.Deployment
	services    []*corev1.Service
	configMaps  map[string]*corev1.ConfigMap
	pdbs        []*policyv1.PodDisruptionBudget
}

// loadManifests decodes every YAML document under the current directory
// (deploy/), grouped by directory.
func loadManifests(t *testing.T) map[string]*manifestSet {
	t.Helper()
	sets := map[string]*manifestSet{}
	err := filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if ext := filepath.Ext(p); ext != ".yaml" && ext != ".yml" {
			return nil
		}
		raw, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		dir := filepath.ToSlash(filepath.Dir(p))
		set := sets[dir]
		if set == nil {
			set = &manifestSet{dir: dir, configMaps: map[string]*corev1.ConfigMap{}}
			sets[dir] = set
		}
		for i, doc := range docSeparator.Split(string(raw), -1) {
			where := fmt.Sprintf("%s (document %d)", filepath.ToSlash(p), i+1)
			obj, err := decode([]byte(doc))
			if err != nil {
				t.Errorf("%s: %v", where, err)
				continue
			}
			switch o := obj.(type) {
			case nil:
			case *appsv1.Deployment:
				set.deployments = append(set.deployments, o)
			case *corev1.Service:
				set.services = append(set.services, o)
			case *corev1.ConfigMap:
				if set.configMaps[o.Name] != nil {
					t.Errorf("%s: a second ConfigMap %q", where, o.Name)
				}
				set.configMaps[o.Name] = o
			case *policyv1.PodDisruptionBudget:
				set.pdbs = append(set.pdbs, o)
			}
			if m, ok := obj.(metav1.Object); ok && m.GetName() == "" {
				t.Errorf("%s: no metadata.name", where)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return sets
}

func TestDecodeRefusesWhatTheAPIServerWould(t *testing.T) {
	const deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n"
	for name, doc := range map[string]string{
		"unknown field":   deployment + "spec:\n  replica: 3\n",
		"mis-cased field": deployment + "spec:\n  Replicas: 3\n",
		"duplicate key":   deployment + "spec:\n  replicas: 3\n  replicas: 2\n",
		"unknown kind":    "apiVersion: v1\nkind: Secret\nmetadata:\n  name: x\n",
		"wrong version":   "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata:\n  name: x\n",
		"nested unknown":  deployment + "spec:\n  template:\n    spec:\n      containers:\n        - name: a\n          securityContext:\n            readOnlyRootFS: true\n",
	} {
		if _, err := decode([]byte(doc)); err == nil {
			t.Errorf("%s: decoded without an error", name)
		}
	}
	obj, err := decode([]byte(deployment + "spec:\n  replicas: 3\n"))
	if err != nil {
		t.Fatal(err)
	}
	if d := obj.(*appsv1.Deployment); d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
		t.Errorf("replicas: %v", d.Spec.Replicas)
	}
}

// flagInfo is a flag of `rlsproxy serve` and its default.
type flagInfo struct{ def string }

// serveFlags builds cmd/rlsproxy and reads the flags of `rlsproxy serve -h`,
// keyed by their RLSPROXY_<FLAG> variable. Reading the binary's own help
// (rather than a copy of the list) keeps the test true to the flags as they
// are.
func serveFlags(t *testing.T) map[string]flagInfo {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build cmd/rlsproxy: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "rlsproxy")
	build := exec.Command(goTool, "build", "-o", bin, "github.com/rlsproxy/rlsproxy/cmd/rlsproxy")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/rlsproxy: %v\n%s", err, out)
	}
	help := exec.Command(bin, "serve", "-h")
	// Only the help text: no RLSPROXY_* of the test's environment.
	help.Env = []string{}
	out, _ := help.CombinedOutput() // -h exits with status 2
	flags := parseHelp(string(out))
	for _, must := range []string{"RLSPROXY_UPSTREAM", "RLSPROXY_LISTEN", "RLSPROXY_ADMIN_LISTEN", "RLSPROXY_SHUTDOWN_TIMEOUT"} {
		if _, ok := flags[must]; !ok {
			t.Fatalf("rlsproxy serve -h: no %s among %d flags read from:\n%s", must, len(flags), out)
		}
	}
	return flags
}

var (
	helpFlag    = regexp.MustCompile(`^  -([a-z0-9][a-z0-9-]*)(?:\s|$)`)
	helpDefault = regexp.MustCompile(`\(default ("(?:[^"\\]|\\.)*"|[^)]*)\)\s*$`)
)

// parseHelp reads the flag package's usage listing: "  -name type" lines,
// each followed by indented usage lines ending in "(default X)" where X is
// not the zero value.
func parseHelp(help string) map[string]flagInfo {
	flags := map[string]flagInfo{}
	var name string
	var usage strings.Builder
	done := func() {
		if name == "" {
			return
		}
		var f flagInfo
		if m := helpDefault.FindStringSubmatch(strings.TrimSpace(usage.String())); m != nil {
			f.def = m[1]
			if s, err := strconv.Unquote(f.def); err == nil {
				f.def = s
			}
		}
		flags["RLSPROXY_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_"))] = f
	}
	for line := range strings.Lines(help) {
		if m := helpFlag.FindStringSubmatch(line); m != nil {
			done()
			name = m[1]
			usage.Reset()
			continue
		}
		if name != "" && strings.HasPrefix(line, "    ") {
			usage.WriteString(line)
		}
	}
	done()
	return flags
}

func TestParseHelp(t *testing.T) {
	flags := parseHelp("Usage of rlsproxy serve:\n" +
		"  -admin-listen address\n    \taddress of /metrics; empty: off (default \"127.0.0.1:9187\")\n" +
		"  -insecure-plaintext\n    \taccept tokens\n" +
		"  -shutdown-timeout duration\n    \ton SIGTERM, time (default 30s)\n")
	want := map[string]flagInfo{
		"RLSPROXY_ADMIN_LISTEN":       {def: "127.0.0.1:9187"},
		"RLSPROXY_INSECURE_PLAINTEXT": {},
		"RLSPROXY_SHUTDOWN_TIMEOUT":   {def: "30s"},
	}
	if fmt.Sprint(flags) != fmt.Sprint(want) {
		t.Errorf("parseHelp: %v, want %v", flags, want)
	}
}

// envValue is a container's environment variable as the manifests set it.
type envValue struct {
	value  string // the value, unless it comes from a Secret or a field
	known  bool   // value is known (a literal or a ConfigMap key)
	secret bool   // from a Secret key
}

// containerEnv resolves a container's environment: envFrom ConfigMaps
// (which must be in the same directory), then env, which wins. envFrom
// Secrets are refused: their keys cannot be checked against the flags.
func containerEnv(set *manifestSet, c *corev1.Container) (map[string]envValue, error) {
	env := map[string]envValue{}
	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			cm := set.configMaps[from.ConfigMapRef.Name]
			if cm == nil {
				return nil, fmt.Errorf("envFrom: ConfigMap %q is not among the manifests of %s", from.ConfigMapRef.Name, set.dir)
			}
			for k, v := range cm.Data {
				env[from.Prefix+k] = envValue{value: v, known: true}
			}
		default:
			return nil, fmt.Errorf("envFrom other than a ConfigMap: its keys cannot be checked; use env with secretKeyRef")
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = envValue{value: e.Value, known: true}
		case e.ValueFrom.SecretKeyRef != nil:
			env[e.Name] = envValue{secret: true}
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			cm := set.configMaps[ref.Name]
			if cm == nil {
				return nil, fmt.Errorf("env %s: ConfigMap %q is not among the manifests of %s", e.Name, ref.Name, set.dir)
			}
			v, ok := cm.Data[ref.Key]
			if !ok {
				return nil, fmt.Errorf("env %s: ConfigMap %q has no key %q", e.Name, ref.Name, ref.Key)
			}
			env[e.Name] = envValue{value: v, known: true}
		default:
			env[e.Name] = envValue{}
		}
	}
	return env, nil
}

// setting is the value rlsproxy sees for a flag: the environment's, or the
// flag's default.
func setting(env map[string]envValue, flags map[string]flagInfo, name string) string {
	if v, ok := env[name]; ok && v.known {
		return v.value
	}
	return flags[name].def
}

// proxyPod is an rlsproxy container in its pod.
type proxyPod struct {
	set         *manifestSet
	dep         *appsv1.Deployment
	c           *corev1.Container
	sidecarInit bool // a native sidecar (init container, restartPolicy Always)
	env         map[string]envValue
	flags       map[string]flagInfo
}

func (p proxyPod) where() string {
	return fmt.Sprintf("%s: Deployment %s, container %s", p.set.dir, p.dep.Name, p.c.Name)
}

func isProxyImage(ref string) bool {
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		ref = ref[:i]
	}
	return ref == image
}

// proxyContainers finds the rlsproxy containers of a Deployment, in
// containers and init containers alike.
func proxyContainers(set *manifestSet, dep *appsv1.Deployment, flags map[string]flagInfo) ([]proxyPod, error) {
	var out []proxyPod
	spec := &dep.Spec.Template.Spec
	add := func(c *corev1.Container, init bool) error {
		if !isProxyImage(c.Image) {
			return nil
		}
		env, err := containerEnv(set, c)
		if err != nil {
			return fmt.Errorf("%s: Deployment %s, container %s: %w", set.dir, dep.Name, c.Name, err)
		}
		out = append(out, proxyPod{set: set, dep: dep, c: c, sidecarInit: init, env: env, flags: flags})
		return nil
	}
	for i := range spec.InitContainers {
		if err := add(&spec.InitContainers[i], true); err != nil {
			return nil, err
		}
	}
	for i := range spec.Containers {
		if err := add(&spec.Containers[i], false); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// containerPort resolves a probe's or Service's port (a number or a name).
func containerPort(c *corev1.Container, p intstr.IntOrString) (int32, bool) {
	if p.Type == intstr.Int {
		return p.IntVal, p.IntVal > 0
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

// listenAddrs splits --listen.
func listenAddrs(v string) []string {
	var out []string
	for a := range strings.SplitSeq(v, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

func isLoopback(addr string) bool {
	if strings.HasPrefix(addr, "/") {
		return true // a unix socket directory: in the pod
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func tcpPort(addr string) (int32, bool) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(port, 10, 32)
	return int32(n), err == nil && n > 0
}

// checkProxy checks what every rlsproxy container must be, sidecar or
// standalone.
func checkProxy(t *testing.T, p proxyPod) {
	t.Helper()
	where := p.where()
	errorf := func(format string, args ...any) {
		t.Helper()
		t.Errorf("%s: %s", where, fmt.Sprintf(format, args...))
	}
	pod := &p.dep.Spec.Template.Spec
	c := p.c

	// The command: the image's entrypoint, serve.
	if len(c.Command) > 0 {
		errorf("command %q replaces the image's entrypoint", c.Command)
	}
	if len(c.Args) > 0 && !slices.Equal(c.Args, []string{"serve"}) {
		errorf("args %q: want serve (its flags come from RLSPROXY_* variables)", c.Args)
	}
	if p.sidecarInit && (c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways) {
		errorf("an init container without restartPolicy: Always would have to exit before the pod starts")
	}

	// Every RLSPROXY_* variable is a flag of rlsproxy serve.
	for name := range p.env {
		if !strings.HasPrefix(name, "RLSPROXY_") {
			continue
		}
		if _, ok := p.flags[name]; !ok {
			errorf("%s is not the variable of any flag of rlsproxy serve", name)
		}
	}
	if v, ok := p.env["RLSPROXY_UPSTREAM"]; !ok || !v.secret {
		errorf("RLSPROXY_UPSTREAM (the service login's DSN and password) must come from a Secret (secretKeyRef)")
	}
	// Files holding secrets are read from Secret volumes.
	for _, name := range []string{"RLSPROXY_SIGNING_KEY_FILE", "RLSPROXY_TLS_CERT", "RLSPROXY_TLS_KEY"} {
		v, ok := p.env[name]
		switch {
		case !ok:
		case !v.known:
			errorf("%s: the path must be a literal, to be checked against the volumes", name)
		case v.value != "":
			checkSecretFile(t, where, pod, c, name, v.value)
		}
	}

	// A unix socket directory needs a writable volume: the root filesystem
	// is read-only.
	for _, a := range listenAddrs(setting(p.env, p.flags, "RLSPROXY_LISTEN")) {
		if !strings.HasPrefix(a, "/") {
			continue
		}
		dir := a
		if i := strings.LastIndex(dir, ":"); i > 0 {
			dir = dir[:i]
		}
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return path.Clean(m.MountPath) == path.Clean(dir) && !m.ReadOnly && slices.ContainsFunc(pod.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name && v.EmptyDir != nil })
		}) {
			errorf("RLSPROXY_LISTEN %s: the socket directory must be a writable emptyDir mount (shared with the application)", a)
		}
	}

	// The admin listener must face the pod network: the kubelet probes over
	// the pod's address. Its default (127.0.0.1:9187) does not.
	admin, ok := p.env["RLSPROXY_ADMIN_LISTEN"]
	var adminPort int32
	switch {
	case !ok || !admin.known:
		errorf("RLSPROXY_ADMIN_LISTEN is not set: the default %q is out of the kubelet's reach", p.flags["RLSPROXY_ADMIN_LISTEN"].def)
	default:
		host, port, err := net.SplitHostPort(admin.value)
		if ip := net.ParseIP(host); err != nil || (host != "" && (ip == nil || !ip.IsUnspecified())) {
			errorf("RLSPROXY_ADMIN_LISTEN=%q: want 0.0.0.0:<port>, where the kubelet's probes reach it", admin.value)
		}
		n, err := strconv.ParseInt(port, 10, 32)
		if err != nil {
			errorf("RLSPROXY_ADMIN_LISTEN=%q: port: %v", admin.value, err)
		}
		adminPort = int32(n)
	}
	probe := func(what string, pr *corev1.Probe, paths ...string) {
		t.Helper()
		if pr == nil {
			errorf("no %s probe", what)
			return
		}
		if pr.HTTPGet == nil {
			errorf("%s probe: want an httpGet on the admin listener", what)
			return
		}
		port, ok := containerPort(c, pr.HTTPGet.Port)
		if adminPort != 0 && (!ok || port != adminPort) {
			errorf("%s probe: port %s is not the admin listener's %d", what, pr.HTTPGet.Port.String(), adminPort)
		}
		if !slices.Contains(paths, pr.HTTPGet.Path) {
			errorf("%s probe: path %q, want one of %q", what, pr.HTTPGet.Path, paths)
		}
		if s := pr.HTTPGet.Scheme; s != "" && s != corev1.URISchemeHTTP {
			errorf("%s probe: scheme %s; the admin listener speaks plain HTTP", what, s)
		}
	}
	probe("readiness", c.ReadinessProbe, "/readyz")
	probe("liveness", c.LivenessProbe, "/healthz")
	if c.StartupProbe != nil {
		probe("startup", c.StartupProbe, "/healthz", "/readyz")
	}

	// Non-root, read-only, nothing added.
	checkSecurity(t, where, pod, c)
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		errorf("automountServiceAccountToken: want false, the proxy never calls the Kubernetes API")
	}
	if pod.EnableServiceLinks == nil || *pod.EnableServiceLinks {
		errorf("enableServiceLinks: want false; a Service named rlsproxy would add RLSPROXY_* variables to the proxy's environment")
	}
	if pod.HostNetwork || pod.HostPID || pod.HostIPC {
		errorf("host network, PID or IPC namespace")
	}
	for _, v := range pod.Volumes {
		if v.HostPath != nil {
			errorf("volume %s: hostPath", v.Name)
		}
	}

	// Resources, with room for the guard's parser helpers.
	req, lim := c.Resources.Requests, c.Resources.Limits
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		q, okR := req[r]
		l, okL := lim[r]
		if !okR || !okL {
			errorf("resources: want a request and a limit of %s", r)
			continue
		}
		if q.Cmp(l) > 0 {
			errorf("resources: %s request %s above its limit %s", r, q.String(), l.String())
		}
	}
	if mem, ok := lim[corev1.ResourceMemory]; ok && setting(p.env, p.flags, "RLSPROXY_GUARD") != "off" {
		parsers, err1 := strconv.ParseInt(setting(p.env, p.flags, "RLSPROXY_GUARD_PARSERS"), 10, 64)
		mib, err2 := strconv.ParseInt(setting(p.env, p.flags, "RLSPROXY_GUARD_PARSER_MEMORY"), 10, 64)
		if err1 != nil || err2 != nil {
			errorf("--guard-parsers, --guard-parser-memory: %v %v", err1, err2)
		} else if helpers := parsers * mib << 20; mem.Value() <= helpers {
			errorf("memory limit %s is not above the guard's parser helpers' %d x %d MiB: lower RLSPROXY_GUARD_PARSER_MEMORY or raise the limit", mem.String(), parsers, mib)
		}
	}

	// SIGTERM: the grace period outlasts the preStop sleep and the drain.
	shutdown, err := time.ParseDuration(setting(p.env, p.flags, "RLSPROXY_SHUTDOWN_TIMEOUT"))
	if err != nil {
		errorf("--shutdown-timeout: %v", err)
	}
	var sleep time.Duration
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil {
		if s := c.Lifecycle.PreStop.Sleep; s != nil {
			sleep = time.Duration(s.Seconds) * time.Second
		} else {
			errorf("preStop: only the sleep action works in the image (no shell)")
		}
	}
	grace := 30 * time.Second // Kubernetes' default
	if pod.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	}
	if grace <= sleep+shutdown {
		errorf("terminationGracePeriodSeconds %v: not longer than the preStop sleep %v plus --shutdown-timeout %v; sessions would be killed, not ended", grace, sleep, shutdown)
	}
}

// checkSecretFile checks that a file flag's path lies in a read-only mount of
// a Secret that holds it.
func checkSecretFile(t *testing.T, where string, pod *corev1.PodSpec, c *corev1.Container, name, file string) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		rel, ok := strings.CutPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/")
		if !ok {
			continue
		}
		var vol *corev1.Volume
		for i := range pod.Volumes {
			if pod.Volumes[i].Name == m.Name {
				vol = &pod.Volumes[i]
			}
		}
		switch {
		case vol == nil:
			t.Errorf("%s: %s: volume %q is not in the pod", where, name, m.Name)
		case vol.Secret == nil:
			t.Errorf("%s: %s=%s: volume %q is not a Secret", where, name, file, m.Name)
		case !m.ReadOnly:
			t.Errorf("%s: %s: mount %q is not readOnly", where, name, m.MountPath)
		case m.SubPath != "":
			t.Errorf("%s: %s: a subPath mount is never updated when the Secret changes", where, name)
		case len(vol.Secret.Items) > 0 && !slices.ContainsFunc(vol.Secret.Items, func(it corev1.KeyToPath) bool { return path.Clean(it.Path) == rel }):
			t.Errorf("%s: %s=%s: Secret volume %q has no item at %q", where, name, file, m.Name, rel)
		case vol.Secret.DefaultMode != nil && *vol.Secret.DefaultMode&0o007 != 0:
			t.Errorf("%s: %s: Secret volume %q is readable by others (mode %#o)", where, name, m.Name, *vol.Secret.DefaultMode)
		}
		return
	}
	t.Errorf("%s: %s=%s is in no mounted volume", where, name, file)
}

// checkSecurity checks a container's effective security context: its own
// settings, else the pod's.
func checkSecurity(t *testing.T, where string, pod *corev1.PodSpec, c *corev1.Container) {
	t.Helper()
	psc := pod.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	sc := c.SecurityContext
	if sc == nil {
		t.Errorf("%s: no securityContext", where)
		return
	}
	runAsNonRoot, runAsUser, seccomp := psc.RunAsNonRoot, psc.RunAsUser, psc.SeccompProfile
	if sc.RunAsNonRoot != nil {
		runAsNonRoot = sc.RunAsNonRoot
	}
	if sc.RunAsUser != nil {
		runAsUser = sc.RunAsUser
	}
	if sc.SeccompProfile != nil {
		seccomp = sc.SeccompProfile
	}
	if runAsNonRoot == nil || !*runAsNonRoot {
		t.Errorf("%s: runAsNonRoot: want true", where)
	}
	if runAsUser == nil || *runAsUser != nonroot {
		t.Errorf("%s: runAsUser: want %d, the image's nonroot user", where, nonroot)
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccompProfile: want RuntimeDefault", where)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s: readOnlyRootFilesystem: want true", where)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation: want false", where)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("%s: privileged", where)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
		t.Errorf("%s: capabilities: want drop [ALL] and nothing added", where)
	}
}

// selects reports whether a label selector selects a pod template.
func selects(t *testing.T, where string, sel *metav1.LabelSelector, podLabels map[string]string) bool {
	t.Helper()
	if sel == nil || (len(sel.MatchLabels) == 0 && len(sel.MatchExpressions) == 0) {
		t.Errorf("%s: an empty selector selects every pod of the namespace", where)
		return false
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Errorf("%s: selector: %v", where, err)
		return false
	}
	return s.Matches(labels.Set(podLabels))
}

func TestManifests(t *testing.T) {
	flags := serveFlags(t)
	sets := loadManifests(t)
	for _, dir := range []string{"sidecar", "standalone"} {
		if sets[dir] == nil {
			t.Fatalf("no manifests in deploy/%s", dir)
		}
	}
	for dir := range sets {
		if dir != "sidecar" && dir != "standalone" {
			t.Errorf("deploy/%s: manifests this test does not check", dir)
		}
	}
	t.Run("sidecar", func(t *testing.T) { checkSidecar(t, sets["sidecar"], flags) })
	t.Run("standalone", func(t *testing.T) { checkStandalone(t, sets["standalone"], flags) })
}

// checkSidecar: an application's pod with rlsproxy beside it, listening on
// loopback only.
func checkSidecar(t *testing.T, set *manifestSet, flags map[string]flagInfo) {
	if len(set.deployments) == 0 {
		t.Fatal("no Deployment")
	}
	for _, dep := range set.deployments {
		proxies, err := proxyContainers(set, dep, flags)
		if err != nil {
			t.Fatal(err)
		}
		if len(proxies) != 1 {
			t.Fatalf("Deployment %s: %d rlsproxy containers, want 1", dep.Name, len(proxies))
		}
		p := proxies[0]
		checkProxy(t, p)
		if !slices.ContainsFunc(dep.Spec.Template.Spec.Containers, func(c corev1.Container) bool { return !isProxyImage(c.Image) }) {
			t.Errorf("%s: no application container beside the proxy", p.where())
		}
		if !selects(t, "Deployment "+dep.Name, dep.Spec.Selector, dep.Spec.Template.Labels) {
			t.Errorf("Deployment %s: its selector does not select its pods", dep.Name)
		}
		// The token never leaves the pod: the client listener is on loopback
		// (the image's RLSPROXY_LISTEN is 0.0.0.0:6432, so it must be set).
		listen, ok := p.env["RLSPROXY_LISTEN"]
		if !ok || !listen.known {
			t.Errorf("%s: RLSPROXY_LISTEN must be set to a loopback address (the image listens on 0.0.0.0)", p.where())
		} else {
			for _, a := range listenAddrs(listen.value) {
				if !isLoopback(a) {
					t.Errorf("%s: RLSPROXY_LISTEN=%s: %s is not loopback; a sidecar's tokens must not leave the pod", p.where(), listen.value, a)
				}
			}
		}
		for _, cp := range p.c.Ports {
			for _, a := range listenAddrs(listen.value) {
				if port, ok := tcpPort(a); ok && cp.ContainerPort == port {
					t.Errorf("%s: port %d is declared, but the client listener is loopback only", p.where(), port)
				}
			}
		}
	}
	for _, svc := range set.services {
		t.Errorf("Service %s: a sidecar's proxy is for its pod only", svc.Name)
	}
}

// checkStandalone: three replicas behind a Service and a headless Service,
// with a disruption budget.
func checkStandalone(t *testing.T, set *manifestSet, flags map[string]flagInfo) {
	if len(set.deployments) != 1 {
		t.Fatalf("%d Deployments, want 1", len(set.deployments))
	}
	dep := set.deployments[0]
	proxies, err := proxyContainers(set, dep, flags)
	if err != nil {
		t.Fatal(err)
	}
	if len(proxies) != 1 || len(dep.Spec.Template.Spec.Containers) != 1 || len(dep.Spec.Template.Spec.InitContainers) != 0 {
		t.Fatalf("Deployment %s: want the rlsproxy container alone", dep.Name)
	}
	p := proxies[0]
	checkProxy(t, p)
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 3 {
		t.Errorf("Deployment %s: replicas %s, want 3", dep.Name, strconv.Itoa(int(ptrOr(dep.Spec.Replicas, 1))))
	}
	podLabels := dep.Spec.Template.Labels
	if !selects(t, "Deployment "+dep.Name, dep.Spec.Selector, podLabels) {
		t.Errorf("Deployment %s: its selector does not select its pods", dep.Name)
	}

	// The client listener faces the network: TLS, and a port the Service
	// reaches.
	listen := setting(p.env, flags, "RLSPROXY_LISTEN")
	var listenPorts []int32
	for _, a := range listenAddrs(listen) {
		if isLoopback(a) {
			t.Errorf("%s: RLSPROXY_LISTEN=%s: %s is loopback, out of the Service's reach", p.where(), listen, a)
		}
		if port, ok := tcpPort(a); ok {
			listenPorts = append(listenPorts, port)
		}
	}
	for _, name := range []string{"RLSPROXY_TLS_CERT", "RLSPROXY_TLS_KEY", "RLSPROXY_SIGNING_KEY_FILE"} {
		if v, ok := p.env[name]; !ok || !v.known || v.value == "" {
			t.Errorf("%s: %s is not set", p.where(), name)
		}
	}
	if v := setting(p.env, flags, "RLSPROXY_INSECURE_PLAINTEXT"); v == "true" || v == "1" {
		t.Errorf("%s: RLSPROXY_INSECURE_PLAINTEXT: tokens would cross the network in plaintext", p.where())
	}

	// Services: one for clients, one headless for the peers.
	var client int
	var headless []string
	for _, svc := range set.services {
		where := "Service " + svc.Name
		if len(svc.Spec.Selector) == 0 || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(podLabels)) {
			t.Errorf("%s: selector %v does not select the pods of Deployment %s (%v)", where, svc.Spec.Selector, dep.Name, podLabels)
		}
		if len(svc.Spec.Ports) == 0 && svc.Spec.ClusterIP != corev1.ClusterIPNone {
			t.Errorf("%s: no ports", where)
		}
		for _, sp := range svc.Spec.Ports {
			target := sp.TargetPort
			if target.Type == intstr.Int && target.IntVal == 0 {
				target = intstr.FromInt32(sp.Port)
			}
			port, ok := containerPort(p.c, target)
			if !ok || !slices.ContainsFunc(p.c.Ports, func(cp corev1.ContainerPort) bool { return cp.ContainerPort == port }) {
				t.Errorf("%s: port %d targets %s, no port of the rlsproxy container", where, sp.Port, target.String())
				continue
			}
			if svc.Spec.ClusterIP != corev1.ClusterIPNone {
				if !slices.Contains(listenPorts, port) {
					t.Errorf("%s: port %d targets %d, not the client listener (%s)", where, sp.Port, port, listen)
				}
				if sp.Port != 5432 && sp.Port != 6432 {
					t.Errorf("%s: port %d, want 5432 or 6432", where, sp.Port)
				}
				client++
			}
		}
		if svc.Spec.ClusterIP == corev1.ClusterIPNone {
			headless = append(headless, svc.Name)
		}
	}
	if client == 0 {
		t.Errorf("no Service for clients (a port to the client listener)")
	}
	if len(headless) != 1 {
		t.Fatalf("%d headless Services (clusterIP: None), want 1 for peer discovery", len(headless))
	}
	// The replicas find each other by the headless Service's name, on their
	// client listener's port (once rlsproxy serve has --peers).
	if _, ok := flags["RLSPROXY_PEERS"]; ok {
		checkPeers(t, p, headless[0], listenPorts)
	}

	// The disruption budget covers the replicas and lets one go at a time.
	if len(set.pdbs) != 1 {
		t.Fatalf("%d PodDisruptionBudgets, want 1", len(set.pdbs))
	}
	pdb := set.pdbs[0]
	if !selects(t, "PodDisruptionBudget "+pdb.Name, pdb.Spec.Selector, podLabels) {
		t.Errorf("PodDisruptionBudget %s: does not select the pods of Deployment %s", pdb.Name, dep.Name)
	}
	replicas := int(*dep.Spec.Replicas)
	switch s := pdb.Spec; {
	case s.MaxUnavailable != nil && s.MinAvailable != nil:
		t.Errorf("PodDisruptionBudget %s: both minAvailable and maxUnavailable", pdb.Name)
	case s.MaxUnavailable != nil:
		if n, err := intstr.GetScaledValueFromIntOrPercent(s.MaxUnavailable, replicas, true); err != nil || n < 1 || n >= replicas {
			t.Errorf("PodDisruptionBudget %s: maxUnavailable %s of %d replicas (%v)", pdb.Name, s.MaxUnavailable.String(), replicas, err)
		}
	case s.MinAvailable != nil:
		if n, err := intstr.GetScaledValueFromIntOrPercent(s.MinAvailable, replicas, true); err != nil || n < 1 || n >= replicas {
			t.Errorf("PodDisruptionBudget %s: minAvailable %s of %d replicas would block every drain or protect nothing (%v)", pdb.Name, s.MinAvailable.String(), replicas, err)
		}
	default:
		t.Errorf("PodDisruptionBudget %s: neither minAvailable nor maxUnavailable", pdb.Name)
	}
}

// checkPeers checks that RLSPROXY_PEERS names the headless Service (short,
// namespaced or fully qualified) and a port of the client listener.
func checkPeers(t *testing.T, p proxyPod, headless string, listenPorts []int32) {
	t.Helper()
	v, ok := p.env["RLSPROXY_PEERS"]
	if !ok || !v.known {
		t.Errorf("%s: RLSPROXY_PEERS is not set: a CancelRequest the Service sends to another replica is lost", p.where())
		return
	}
	peers := listenAddrs(v.value)
	if len(peers) != 1 {
		t.Errorf("%s: RLSPROXY_PEERS=%q: want the headless Service %s alone", p.where(), v.value, headless)
		return
	}
	host, port, err := net.SplitHostPort(peers[0])
	if err != nil {
		t.Errorf("%s: RLSPROXY_PEERS=%q: %v", p.where(), v.value, err)
		return
	}
	parts := strings.Split(host, ".")
	if parts[0] != headless || (len(parts) > 2 && parts[2] != "svc") {
		t.Errorf("%s: RLSPROXY_PEERS=%q: host %s is not the headless Service %s", p.where(), v.value, host, headless)
	}
	if n, err := strconv.ParseInt(port, 10, 32); err != nil || !slices.Contains(listenPorts, int32(n)) {
		t.Errorf("%s: RLSPROXY_PEERS=%q: port %s is not the client listener's %v (the pods' port, not a Service's)", p.where(), v.value, port, listenPorts)
	}
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

package deploy_test

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rlsproxy/rlsproxy/proxy"
	"github.com/rlsproxy/rlsproxy/session"
)

const dashboardFile = "grafana/rlsproxy-dashboard.json"

// family is a metric family the proxy exports.
type family struct {
	name   string
	typ    string // COUNTER, GAUGE, HISTOGRAM, SUMMARY, UNTYPED; "" if unknown
	labels map[string]bool
	// values are the label values of the series gathered, by label; only
	// for families that had series when gathered.
	values map[string]map[string]bool
}

// series are the names a family's samples carry in Prometheus.
func (f *family) series() []string {
	switch f.typ {
	case "HISTOGRAM":
		return []string{f.name + "_bucket", f.name + "_sum", f.name + "_count"}
	case "SUMMARY":
		return []string{f.name, f.name + "_sum", f.name + "_count"}
	default:
		// Counters carry their own name (ending in _total), gauges too; a
		// family of unknown type is allowed only its bare name, which can
		// refuse a valid series but never accept a missing one.
		return []string{f.name}
	}
}

// exported is what /metrics exports: families by name, and series names to
// their family.
type exported struct {
	families map[string]*family
	series   map[string]*family
}

// recorder is a prometheus.Registerer that notes what each collector
// describes before registering it: a vector with no series yet (a reason
// nothing has ended for) is absent from Gather, but not from Describe.
type recorder struct {
	reg      *prometheus.Registry
	families map[string]*family
}

var (
	descName   = regexp.MustCompile(`fqName: ("(?:[^"\\]|\\.)*")`)
	descLabels = regexp.MustCompile(`variableLabels: \{([^}]*)\}\}$`)
	descConst  = regexp.MustCompile(`constLabels: \{([^}]*)\}`)
	constName  = regexp.MustCompile(`(?:^|,)([a-zA-Z_][a-zA-Z0-9_]*)=`)
)

func (r *recorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc)
	go func() { c.Describe(ch); close(ch) }()
	var typ string
	switch c.(type) {
	case *prometheus.CounterVec:
		typ = "COUNTER"
	case *prometheus.GaugeVec:
		typ = "GAUGE"
	case *prometheus.HistogramVec:
		typ = "HISTOGRAM"
	case *prometheus.SummaryVec:
		typ = "SUMMARY"
	}
	var descErr error
	for d := range ch {
		s := d.String()
		m := descName.FindStringSubmatch(s)
		if m == nil {
			descErr = fmt.Errorf("cannot read the name of %s", s)
			continue
		}
		name, err := strconv.Unquote(m[1])
		if err != nil {
			descErr = err
			continue
		}
		f := &family{name: name, typ: typ, labels: map[string]bool{}, values: map[string]map[string]bool{}}
		if m := descLabels.FindStringSubmatch(s); m != nil {
			for l := range strings.SplitSeq(m[1], ",") {
				l = strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")")
				if l != "" {
					f.labels[l] = true
				}
			}
		}
		if m := descConst.FindStringSubmatch(s); m != nil {
			for _, c := range constName.FindAllStringSubmatch(m[1], -1) {
				f.labels[c[1]] = true
			}
		}
		r.families[name] = f
	}
	if descErr != nil {
		return descErr
	}
	return r.reg.Register(c)
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

func (r *recorder) Unregister(c prometheus.Collector) bool { return r.reg.Unregister(c) }

// proxyMetrics builds the registry the way cmd/rlsproxy's serve does (Go and
// process collectors, proxy.NewMetrics, proxy.RegisterPool over a pool, and
// the /metrics handler's own counter) and reads every family it exports.
func proxyMetrics(t *testing.T) *exported {
	t.Helper()
	r := &recorder{reg: prometheus.NewRegistry(), families: map[string]*family{}}
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := proxy.NewMetrics(r)
	// Series the proxy creates at once in use; they let label values be
	// checked too.
	m.JWKSFetched(true)
	m.JWKSFetched(false)
	m.TokenCacheLookup(true)
	m.TokenCacheLookup(false)
	// The pool never connects here: its collector reads an empty snapshot.
	dialer, err := session.NewDialer("postgres://rlsproxy@127.0.0.1:1/app?connect_timeout=1", nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := session.NewPool(dialer, session.Policy{}, session.PoolConfig{})
	t.Cleanup(pool.Close)
	proxy.RegisterPool(r, pool)
	_ = promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{Registry: r})

	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		f := r.families[mf.GetName()]
		if f == nil {
			// The name reading from Desc must know every family Gather does.
			t.Fatalf("family %s gathered but not described", mf.GetName())
		}
		f.typ = mf.GetType().String()
		for _, s := range mf.GetMetric() {
			for _, lp := range s.GetLabel() {
				if f.values[lp.GetName()] == nil {
					f.values[lp.GetName()] = map[string]bool{}
				}
				f.values[lp.GetName()][lp.GetValue()] = true
			}
		}
	}
	e := &exported{families: r.families, series: map[string]*family{}}
	for _, f := range r.families {
		for _, s := range f.series() {
			e.series[s] = f
		}
	}
	for _, must := range []string{"rlsproxy_client_connections", "rlsproxy_pool_connections", "rlsproxy_pinned_sessions_total", "process_cpu_seconds_total"} {
		if e.families[must] == nil {
			t.Fatalf("no family %s among %d: reading the registry failed", must, len(e.families))
		}
	}
	return e
}

var (
	// metricToken is a metric name of the families the dashboard may use:
	// the proxy's own, and the Go and process collectors'.
	metricToken = regexp.MustCompile(`\b(?:rlsproxy|process|go)_[a-zA-Z0-9_:]*`)
	// quoted is a PromQL string literal.
	quoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	// grouping is by (...), without (...), on (...), ignoring (...),
	// group_left (...), group_right (...).
	grouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	// matchers is a selector's braces; matcher one label matcher in them.
	matchers = regexp.MustCompile(`\{([^{}]*)\}`)
	matcher  = regexp.MustCompile(`^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*$`)
)

// scrapeLabels are added by Prometheus to every series it scrapes.
var scrapeLabels = map[string]bool{"job": true, "instance": true}

// checkExpr checks that every series a PromQL expression names is exported,
// and that the labels it groups or filters by exist on them. It returns the
// families used.
func (e *exported) checkExpr(expr string) ([]*family, error) {
	if strings.Contains(expr, "__name__") {
		return nil, fmt.Errorf("%q: a __name__ matcher cannot be checked", expr)
	}
	bare := quoted.ReplaceAllString(expr, `""`)
	names := metricToken.FindAllString(bare, -1)
	if len(names) == 0 {
		return nil, fmt.Errorf("%q: names no rlsproxy_, process_ or go_ series", expr)
	}
	var used []*family
	known := map[string]bool{}
	for l := range scrapeLabels {
		known[l] = true
	}
	for _, n := range names {
		f := e.series[n]
		if f == nil {
			return nil, fmt.Errorf("%q: series %s is not exported by rlsproxy serve", expr, n)
		}
		used = append(used, f)
		for l := range f.labels {
			known[l] = true
		}
		if strings.HasSuffix(n, "_bucket") && f.typ == "HISTOGRAM" {
			known["le"] = true
		}
	}
	for _, g := range grouping.FindAllStringSubmatch(bare, -1) {
		for l := range strings.SplitSeq(g[1], ",") {
			if l = strings.TrimSpace(l); l != "" && !known[l] {
				return nil, fmt.Errorf("%q: label %s is on none of its series", expr, l)
			}
		}
	}
	// Matchers, read from the expression with its strings in place.
	for _, sel := range matchers.FindAllStringSubmatch(expr, -1) {
		for _, part := range splitMatchers(sel[1]) {
			m := matcher.FindStringSubmatch(part)
			if m == nil {
				return nil, fmt.Errorf("%q: cannot read matcher %q", expr, part)
			}
			label, op := m[1], m[2]
			value, err := strconv.Unquote(m[3])
			if err != nil {
				return nil, fmt.Errorf("%q: matcher %q: %v", expr, part, err)
			}
			if !known[label] {
				return nil, fmt.Errorf("%q: label %s is on none of its series", expr, label)
			}
			if op != "=" || scrapeLabels[label] {
				continue
			}
			// An exact value must be one the proxy sets, where its series
			// are known.
			for _, f := range used {
				if vs := f.values[label]; vs != nil && !vs[value] {
					return nil, fmt.Errorf("%q: %s never has %s=%q (it has %v)", expr, f.name, label, value, sortedKeys(vs))
				}
			}
		}
	}
	return used, nil
}

// splitMatchers splits a selector's matchers on the commas outside strings.
func splitMatchers(s string) []string {
	var out []string
	var cur strings.Builder
	var inString byte
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case inString != 0:
			cur.WriteByte(ch)
			if ch == '\\' && i+1 < len(s) {
				i++
				cur.WriteByte(s[i])
			} else if ch == inString {
				inString = 0
			}
		case ch == '"' || ch == '\'':
			inString = ch
			cur.WriteByte(ch)
		case ch == ',':
			out = append(out, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(ch)
		}
	}
	if strings.TrimSpace(cur.String()) != "" {
		out = append(out, cur.String())
	}
	return out
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// dashboard is the part of Grafana's dashboard model the test reads.
type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int         `json:"id"`
	Type       string      `json:"type"`
	Title      string      `json:"title"`
	Datasource *datasource `json:"datasource"`
	Panels     []panel     `json:"panels"` // a collapsed row's
	Targets    []target    `json:"targets"`
}

type target struct {
	RefID      string      `json:"refId"`
	Expr       string      `json:"expr"`
	Datasource *datasource `json:"datasource"`
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// labelValuesQuery is a Grafana Prometheus variable query.
var labelValuesQuery = regexp.MustCompile(`^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$`)

func TestDashboard(t *testing.T) {
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("%s: no uid or title", dashboardFile)
	}
	e := proxyMetrics(t)
	used := map[string]bool{}
	ids := map[int]bool{}
	var exprs int

	var walk func(ps []panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
			if ids[p.ID] || p.ID == 0 {
				t.Errorf("%s: id not unique", where)
			}
			ids[p.ID] = true
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: no queries", where)
			}
			if ds := p.Datasource; ds == nil || ds.Type != "prometheus" || ds.UID != "${datasource}" {
				t.Errorf("%s: datasource %v, want the ${datasource} variable", where, ds)
			}
			for _, tg := range p.Targets {
				if tg.Datasource != nil && tg.Datasource.UID != "${datasource}" {
					t.Errorf("%s, query %s: datasource %v, want the ${datasource} variable", where, tg.RefID, tg.Datasource)
				}
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("%s, query %s: no expr", where, tg.RefID)
					continue
				}
				exprs++
				fams, err := e.checkExpr(tg.Expr)
				if err != nil {
					t.Errorf("%s, query %s: %v", where, tg.RefID, err)
				}
				for _, f := range fams {
					used[f.name] = true
				}
			}
		}
	}
	walk(d.Panels)
	if exprs == 0 {
		t.Fatal("no queries read from the dashboard")
	}

	// Variables' queries name series too.
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q string
		var obj struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			if err := json.Unmarshal(v.Query, &obj); err != nil {
				t.Errorf("variable %s: query: %v", v.Name, err)
				continue
			}
			q = obj.Query
		}
		m := labelValuesQuery.FindStringSubmatch(strings.TrimSpace(q))
		if m == nil {
			t.Errorf("variable %s: %q is not label_values(series, label)", v.Name, q)
			continue
		}
		if _, err := e.checkExpr(fmt.Sprintf("count by (%s) (%s)", m[2], m[1])); err != nil {
			t.Errorf("variable %s: %v", v.Name, err)
		}
	}

	// And the dashboard shows every series of the proxy's own.
	for name := range e.families {
		if strings.HasPrefix(name, "rlsproxy_") && !used[name] {
			t.Errorf("%s: no panel shows %s (add one to %s)", dashboardFile, name, dashboardFile)
		}
	}
}

// TestCheckExprRefuses makes sure the dashboard check fails on series the
// proxy does not export, in every form they can take.
func TestCheckExprRefuses(t *testing.T) {
	e := proxyMetrics(t)
	for _, expr := range []string{
		`rate(rlsproxy_no_such_series_total[5m])`,
		`rlsproxy_pool_wait_seconds`,                     // a histogram has no bare series
		`rlsproxy_authentications`,                       // the counter is _total
		`rate(rlsproxy_client_connections_bucket[5m])`,   // a gauge has no buckets
		`sum by (reason) (rlsproxy_relayed_bytes_total)`, // not its label
		`rlsproxy_token_cache_lookups_total{result="hits"}`,
		`rlsproxy_pool_checkouts_total{identity="same"}`,
		`rlsproxy_pool_connections{rol="app"}`,
		`sum(rate({__name__=~"rlsproxy_.*"}[5m]))`,
		`vector(1)`,
	} {
		if _, err := e.checkExpr(expr); err == nil {
			t.Errorf("%s: accepted", expr)
		}
	}
	for _, expr := range []string{
		`histogram_quantile(0.99, sum by (le) (rate(rlsproxy_upstream_connect_seconds_bucket{job=~"$job"}[$__rate_interval])))`,
		`rate(rlsproxy_pool_wait_seconds_sum[5m]) / rate(rlsproxy_pool_wait_seconds_count[5m])`,
		`sum by (role, database) (rlsproxy_pool_connections - rlsproxy_pool_idle_connections)`,
		`sum by (reason) (rate(rlsproxy_pinned_sessions_total[5m]))`,
		`rlsproxy_token_cache_lookups_total{result="hit", instance=~"a,b"}`,
		`rlsproxy_client_connections + rate(rlsproxy_client_connections_total[1m])`,
	} {
		if _, err := e.checkExpr(expr); err != nil {
			t.Errorf("refused: %v", err)
		}
	}
}

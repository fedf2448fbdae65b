package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

// The configuration file (--config): YAML whose keys are the flag names
// and whose values are what the flags take (a list may be written as a
// YAML list). The command line wins over the environment (RLSPROXY_*),
// which wins over the file. `rlsproxy serve` reads it again on SIGHUP
// (reload.go).

// applyConfigFile sets, from the file named by the flag "config", every
// flag neither the command line nor the environment set (given).
func applyConfigFile(fs *flag.FlagSet, given map[string]bool) error {
	f := fs.Lookup("config")
	if f == nil || f.Value.String() == "" {
		return nil
	}
	path := f.Value.String()
	raw, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return fmt.Errorf("--config %s: %w", path, err)
	}
	keys := make([]string, 0, len(doc))
	for k := range doc {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fl := fs.Lookup(k)
		if fl == nil || k == "config" {
			return fmt.Errorf("--config %s: %q is not a flag of rlsproxy %s", path, k, strings.TrimPrefix(fs.Name(), "rlsproxy "))
		}
		if given[k] {
			continue
		}
		v, err := configValue(doc[k])
		if err != nil {
			return fmt.Errorf("--config %s: %s: %w", path, k, err)
		}
		if err := fs.Set(k, v); err != nil {
			return fmt.Errorf("--config %s: invalid value %q for %s: %w", path, v, k, err)
		}
	}
	return nil
}

// configValue is a YAML value as a flag's text.
func configValue(v any) (string, error) {
	switch v := v.(type) {
	case string:
		return v, nil
	case bool, float64, int64, int:
		return fmt.Sprint(v), nil
	case []any:
		parts := make([]string, 0, len(v))
		for _, e := range v {
			s, err := configValue(e)
			if err != nil {
				return "", err
			}
			parts = append(parts, s)
		}
		return strings.Join(parts, ","), nil
	case nil:
		return "", nil
	}
	return "", fmt.Errorf("a value of type %T is not a flag's", v)
}

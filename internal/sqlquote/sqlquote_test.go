package sqlquote

import "testing"

func TestQuote(t *testing.T) {
	for in, want := range map[string]string{
		"plain":  "'plain'",
		"it's":   "'it''s'",
		`C:\x`:   `E'C:\\x'`,
		`a'\b`:   `E'a''\\b'`,
		"":       "''",
		"zoë 東京": "'zoë 東京'",
	} {
		if got := Literal(in); got != want {
			t.Errorf("Literal(%q) = %s, want %s", in, got, want)
		}
	}
	for _, tc := range []struct {
		parts []string
		want  string
	}{
		{[]string{"role"}, `"role"`},
		{[]string{`we"ird`}, `"we""ird"`},
		{[]string{"public", "notes"}, `"public"."notes"`},
	} {
		if got := Ident(tc.parts...); got != tc.want {
			t.Errorf("Ident(%q) = %s, want %s", tc.parts, got, tc.want)
		}
	}
}

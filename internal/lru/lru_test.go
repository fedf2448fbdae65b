package lru

import "testing"

func TestCache(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int
		ops  []string // "+k" add k, "?k" get k (hit), "!k" get k (miss), "-k" remove k
		len  int
	}{
		{"holds up to its size", 2, []string{"+a", "+b", "?a", "?b"}, 2},
		{"forgets the least recently used", 2, []string{"+a", "+b", "?a", "+c", "!b", "?a", "?c"}, 2},
		{"a get makes an entry recent", 2, []string{"+a", "+b", "?a", "+c", "?a", "!b"}, 2},
		{"an add of a present key changes nothing", 2, []string{"+a", "+a", "+b", "?a", "?b"}, 2},
		{"remove", 2, []string{"+a", "-a", "!a", "-a"}, 0},
		{"size 0 holds nothing", 0, []string{"+a", "!a"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := New[string, int](tc.size)
			for i, op := range tc.ops {
				k := op[1:]
				switch op[0] {
				case '+':
					c.Add(k, i)
				case '-':
					c.Remove(k)
				case '?', '!':
					if _, ok := c.Get(k); ok != (op[0] == '?') {
						t.Fatalf("op %d %s: hit %v", i, op, ok)
					}
				}
			}
			if c.Len() != tc.len {
				t.Fatalf("len %d, want %d", c.Len(), tc.len)
			}
		})
	}
}

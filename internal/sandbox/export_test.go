package sandbox

// Waiting is how many requests wait for a slot, for tests that queue them
// in an order.
func Waiting(p *Pool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.waiters)
}

package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

func frame(typ byte, body string) []byte {
	b := []byte{typ}
	b = binary.BigEndian.AppendUint32(b, uint32(len(body)+4))
	return append(b, body...)
}

func TestHeader(t *testing.T) {
	for _, tc := range []struct {
		in        []byte
		typ       byte
		size      int
		ok, isErr bool
	}{
		{nil, 0, 0, false, false},
		{[]byte{'Q', 0, 0, 0}, 0, 0, false, false},
		{frame('Q', "abc"), 'Q', 8, true, false},
		{[]byte{'Q', 0, 0, 0, 3}, 0, 0, false, true},
		{[]byte{'Q', 0xff, 0xff, 0xff, 0xff}, 0, 0, false, true},
	} {
		typ, size, ok, err := Header(tc.in)
		if typ != tc.typ || size != tc.size || ok != tc.ok || (err != nil) != tc.isErr {
			t.Errorf("Header(%v) = %q %d %v %v", tc.in, typ, size, ok, err)
		}
	}
}

func TestReadMessageGrowsAndLimits(t *testing.T) {
	big := bytes.Repeat([]byte("x"), 100)
	src := append(frame('Q', string(big)), frame('S', "")...)
	r := NewReader(iotest.OneByteReader(bytes.NewReader(src)), 16, 200)
	typ, body, err := r.ReadMessage()
	if err != nil || typ != 'Q' || !bytes.Equal(body, big) {
		t.Fatalf("%q %d %v", typ, len(body), err)
	}
	if typ, _, err := r.ReadMessage(); err != nil || typ != 'S' {
		t.Fatalf("%q %v", typ, err)
	}
	r = NewReader(bytes.NewReader(frame('Q', string(big))), 16, 50)
	if _, _, err := r.ReadMessage(); err == nil {
		t.Fatal("a message over the limit was read")
	}
}

func TestReadStartup(t *testing.T) {
	pkt := binary.BigEndian.AppendUint32(nil, 8)
	pkt = binary.BigEndian.AppendUint32(pkt, 80877103)
	r := NewReader(bytes.NewReader(pkt), 4, 0)
	body, err := r.ReadStartup(8, 10000)
	if err != nil || binary.BigEndian.Uint32(body) != 80877103 {
		t.Fatalf("%v %v", body, err)
	}
	for _, n := range []uint32{0, 7, 10001, 1 << 31} {
		r := NewReader(bytes.NewReader(binary.BigEndian.AppendUint32(nil, n)), 16, 0)
		if _, err := r.ReadStartup(8, 10000); err == nil {
			t.Errorf("length %d accepted", n)
		}
	}
	r = NewReader(bytes.NewReader(binary.BigEndian.AppendUint32(nil, 100)), 16, 0)
	if _, err := r.ReadStartup(8, 10000); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated packet: %v", err)
	}
}

// FuzzReader feeds arbitrary bytes through the startup and message paths:
// they must fail cleanly, never panic or over-read.
func FuzzReader(f *testing.F) {
	f.Add(frame('Q', "SELECT 1\x00"))
	f.Add([]byte{0, 0, 0, 8, 4, 210, 22, 47})
	f.Add([]byte{'Q', 0x7f, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b), 16, 1<<12)
		_, _ = r.ReadStartup(8, 10000)
		for range 4 {
			if _, body, err := r.ReadMessage(); err != nil {
				return
			} else if len(body) > 1<<12 {
				t.Fatal("body over the limit")
			}
		}
	})
}

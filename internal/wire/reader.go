// Package wire frames PostgreSQL protocol messages over a byte stream without
// decoding them, so the relay can inspect a message's type and pass its bytes on
// untouched. Decoding, where it is needed, is left to pgproto3.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// HeaderLen is the size of a regular message header: one type byte and a
// four-byte length that counts itself but not the type byte.
const HeaderLen = 5

// ErrInvalidLength is returned for a message whose length field is below four.
var ErrInvalidLength = errors.New("invalid message length")

// Reader buffers a connection and hands out whole messages from its buffer.
// The buffer is reused: a message returned by Next stays valid only until the
// next call to Fill, Next on a message that does not fit, or ReadMessage.
type Reader struct {
	rd   io.Reader
	buf  []byte
	r, w int // unread bytes are buf[r:w]
	max  int // largest message ReadMessage will buffer whole
}

// NewReader returns a Reader with a buffer of size bytes; ReadMessage grows it
// up to maxMessage bytes for a single message.
func NewReader(rd io.Reader, size, maxMessage int) *Reader {
	return NewReaderBuffer(rd, make([]byte, size), maxMessage)
}

// NewReaderBuffer is NewReader over a buffer of the caller's, which may come
// from a pool: Buffer returns it when the Reader is done.
func NewReaderBuffer(rd io.Reader, buf []byte, maxMessage int) *Reader {
	return &Reader{rd: rd, buf: buf, max: maxMessage}
}

// Buffer returns the Reader's current buffer (a larger one if a message
// made it grow).
func (b *Reader) Buffer() []byte { return b.buf }

// Reset points the Reader at a new source and drops buffered bytes.
func (b *Reader) Reset(rd io.Reader) { b.rd, b.r, b.w = rd, 0, 0 }

// ResetBuffered points the Reader at a new source with buffered as its
// unread bytes, as if read from it; the buffer grows to hold them.
func (b *Reader) ResetBuffered(rd io.Reader, buffered []byte) {
	if len(buffered) > len(b.buf) {
		b.buf = make([]byte, len(buffered))
	}
	b.rd, b.r, b.w = rd, 0, copy(b.buf, buffered)
}

// Buffered returns the unread bytes.
func (b *Reader) Buffered() []byte { return b.buf[b.r:b.w] }

// Discard drops n buffered bytes.
func (b *Reader) Discard(n int) { b.r += n }

// Fill compacts the buffer and performs one Read into its free space. It
// returns the error of that read, if any, alongside any bytes read.
func (b *Reader) Fill() error {
	if b.r > 0 {
		n := copy(b.buf, b.buf[b.r:b.w])
		b.r, b.w = 0, n
	}
	if b.w == len(b.buf) {
		return errors.New("wire: Fill on a full buffer")
	}
	n, err := b.rd.Read(b.buf[b.w:])
	b.w += n
	if n > 0 && err == io.EOF {
		err = nil
	}
	return err
}

// Peek reports the next message in the buffer without consuming it: its type,
// its total size including the header, and whether all of it is buffered. ok
// is false when not even the header is buffered.
func (b *Reader) Peek() (typ byte, size int, complete, ok bool, err error) {
	typ, size, ok, err = Header(b.buf[b.r:b.w])
	return typ, size, ok && b.r+size <= b.w, ok, err
}

// ReadMessage returns the next whole message, reading and growing the buffer as
// needed up to the Reader's maximum. body excludes the header.
func (b *Reader) ReadMessage() (typ byte, body []byte, err error) {
	for {
		typ, size, complete, ok, err := b.Peek()
		if err != nil {
			return 0, nil, err
		}
		if complete {
			msg := b.buf[b.r : b.r+size]
			b.r += size
			return typ, msg[HeaderLen:], nil
		}
		if ok && size > len(b.buf) {
			if size > b.max {
				return 0, nil, fmt.Errorf("message of %d bytes exceeds the limit of %d", size, b.max)
			}
			b.grow(size)
		}
		if err := b.Fill(); err != nil {
			return 0, nil, err
		}
	}
}

// ReadStartup returns the body of an untyped startup-phase packet (StartupMessage,
// SSLRequest, CancelRequest, GSSENCRequest): a four-byte length, then the body.
// Packets shorter than minLen or longer than maxLen bytes are an error, as in
// PostgreSQL, which drops such connections without an answer.
func (b *Reader) ReadStartup(minLen, maxLen int) ([]byte, error) {
	for b.w-b.r < 4 {
		if err := b.Fill(); err != nil {
			return nil, err
		}
	}
	n := int(int32(binary.BigEndian.Uint32(b.buf[b.r:])))
	if n < minLen || n > maxLen {
		return nil, fmt.Errorf("invalid length of startup packet: %d", n)
	}
	if n > len(b.buf) {
		b.grow(n)
	}
	for b.w-b.r < n {
		if err := b.Fill(); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	body := b.buf[b.r+4 : b.r+n]
	b.r += n
	return body, nil
}

func (b *Reader) grow(size int) {
	nb := make([]byte, size)
	b.w = copy(nb, b.buf[b.r:b.w])
	b.r = 0
	b.buf = nb
}

// Header decodes the frame header at the start of b: its type and total size
// including the header. ok is false when b is shorter than a header.
func Header(b []byte) (typ byte, size int, ok bool, err error) {
	if len(b) < HeaderLen {
		return 0, 0, false, nil
	}
	n := int32(binary.BigEndian.Uint32(b[1:]))
	if n < 4 {
		return 0, 0, false, fmt.Errorf("%w: %d", ErrInvalidLength, n)
	}
	return b[0], int(n) + 1, true, nil
}

// Size is the capacity of the buffer.
func (b *Reader) Size() int { return len(b.buf) }

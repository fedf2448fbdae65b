package main

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
)

// certReloader serves the TLS certificate of --tls-cert/--tls-key and reads
// the files again on reload, so that a certificate renewed on disk
// (cert-manager, certbot) is used by new sessions without a restart. A pair
// that does not load leaves the previous one in use.
type certReloader struct {
	certFile, keyFile string
	cert              atomic.Pointer[tls.Certificate]
}

func newCertReloader(certFile, keyFile string) (*certReloader, error) {
	c := &certReloader{certFile: certFile, keyFile: keyFile}
	if err := c.reload(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *certReloader) reload() error {
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	c.cert.Store(&cert)
	return nil
}

func (c *certReloader) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.cert.Load(), nil
}

// onHangup handles SIGHUP, which systemctl reload, log rotation and a closed
// terminal send, until stop is called: it must not end the proxy (Go's
// default). It reloads the TLS certificate, if any, and says what else
// needs a restart.
func onHangup(log *slog.Logger, certs *certReloader) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-hup:
			}
			if certs != nil {
				if err := certs.reload(); err != nil {
					log.Error("SIGHUP: the TLS certificate did not load; the previous one stays in use", "error", err)
				} else {
					log.Info("SIGHUP: reloaded the TLS certificate and key", "cert", certs.certFile)
				}
			}
			log.Info("SIGHUP: sessions carry on; other settings take effect on restart")
		}
	}()
	return func() {
		signal.Stop(hup)
		close(done)
	}
}

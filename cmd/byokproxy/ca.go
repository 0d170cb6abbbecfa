package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/pflag"

	"github.com/byokproxy/byokproxy/config"
)

// caValidity is the lifetime of a CA made by "byokproxy ca new". Clients
// trust it explicitly, so replacing it means redeploying it to each of them.
const caValidity = 10 * 365 * 24 * time.Hour

const caUsage = `Usage:
  byokproxy ca new --cert FILE --key FILE

Writes a new certificate authority for the forward proxy (forward.listen):
an ECDSA P-256 key, mode 0600, and a self-signed CA certificate valid for
10 years. Set forward.ca_cert_file and forward.ca_key_file to the two files
and give the certificate, never the key, to the clients that use the proxy.
Existing files are never overwritten.
`

// caCommand runs "byokproxy ca ..." and returns the exit code.
func caCommand(args []string, cio cliIO) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(cio.stderr, caUsage)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	var err error
	switch args[0] {
	case "new":
		err = caNew(args[1:], cio)
	default:
		err = usagef("unknown ca command %q: use new", args[0])
	}
	if err == nil || errors.Is(err, pflag.ErrHelp) {
		return exitOK
	}
	fmt.Fprintf(cio.stderr, "byokproxy: %v\n", err)
	var usage *usageError
	if errors.As(err, &usage) {
		fmt.Fprintln(cio.stderr, `Run "byokproxy ca --help" for usage.`)
		return exitUsage
	}
	return exitFailure
}

func caNew(args []string, cio cliIO) error {
	flags := pflag.NewFlagSet("ca new", pflag.ContinueOnError)
	flags.SetOutput(cio.stderr)
	certFile := flags.String("cert", "", "write the CA certificate (PEM) to this `file`, which must not exist")
	keyFile := flags.String("key", "", "write the CA private key (PEM, mode 0600) to this `file`, which must not exist")
	flags.Usage = func() {
		fmt.Fprint(cio.stderr, caUsage)
		flags.PrintDefaults()
	}
	if err := flags.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	if flags.NArg() > 0 {
		return usagef("unexpected argument %q", flags.Arg(0))
	}
	if *certFile == "" || *keyFile == "" {
		return usagef("ca new: --cert and --key are both required")
	}
	if filepath.Clean(*certFile) == filepath.Clean(*keyFile) {
		return usagef("ca new: --cert and --key must be different files")
	}
	for _, name := range []string{*keyFile, *certFile} {
		if _, err := os.Lstat(name); err == nil {
			return fmt.Errorf("ca new: %s already exists: a CA file is never overwritten; remove it or choose another file", name)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("ca new: %w", err)
		}
	}

	certPEM, keyPEM, err := newCA(time.Now())
	if err != nil {
		return fmt.Errorf("ca new: %w", err)
	}
	if err := createFile(*keyFile, keyPEM, 0o600); err != nil {
		return fmt.Errorf("ca new: %w", err)
	}
	if err := createFile(*certFile, certPEM, 0o644); err != nil {
		// A key without its certificate is of no use; remove the one just
		// written so the command can run again with the same paths.
		os.Remove(*keyFile)
		return fmt.Errorf("ca new: %w", err)
	}
	fmt.Fprintf(cio.stdout, "Wrote the CA certificate to %s and its key to %s.\n"+
		"Set forward.ca_cert_file: %s and forward.ca_key_file: %s, and give clients %s to trust.\n",
		*certFile, *keyFile, *certFile, *keyFile, *certFile)
	return nil
}

// newCA returns a new CA certificate and its PKCS #8 private key, both PEM.
// The CA may sign end-entity certificates only (path length 0).
func newCA(now time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}

	// A random suffix distinguishes the CAs of several installations in a
	// client's trust store.
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"byokproxy"},
			CommonName:   fmt.Sprintf("byokproxy forward proxy CA %x", serial.Bytes()[:4]),
		},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}

	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	return certPEM, keyPEM, nil
}

// createFile creates name with data and mode, failing if it exists.
func createFile(name string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(name)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(name)
		return err
	}
	return nil
}

// forwardCA returns the forward proxy's CA: the configured files or, in
// --dev mode without them, a new CA whose key stays in memory and whose
// certificate is written to a temporary file for clients to trust. certFile
// is the certificate's path either way.
func forwardCA(cfg *config.Config) (ca tls.Certificate, certFile string, err error) {
	if cfg.Forward.CACertFile != "" || !cfg.Dev {
		ca, err = tls.LoadX509KeyPair(cfg.Forward.CACertFile, cfg.Forward.CAKeyFile)
		if err != nil {
			return ca, "", fmt.Errorf("forward.ca_cert_file and forward.ca_key_file: %w", err)
		}
		return ca, cfg.Forward.CACertFile, nil
	}
	certPEM, keyPEM, err := newCA(time.Now())
	if err != nil {
		return ca, "", fmt.Errorf("dev forward proxy CA: %w", err)
	}
	ca, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return ca, "", fmt.Errorf("dev forward proxy CA: %w", err)
	}
	f, err := os.CreateTemp("", "byokproxy-dev-ca-*.pem")
	if err != nil {
		return ca, "", fmt.Errorf("dev forward proxy CA: %w", err)
	}
	defer f.Close()
	if _, err := f.Write(certPEM); err != nil {
		return ca, "", fmt.Errorf("dev forward proxy CA: %w", err)
	}
	return ca, f.Name(), nil
}

package auth

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
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// TLS material of a queen's bus, in one directory (<data>/tls): a CA made
// at first start, and a server certificate it signs for the addresses the
// bus is reached at. Clients verify the server with the CA, which travels
// with the credentials (`rbee hive start` copies both).
const (
	CAFileName         = "ca.pem"
	caKeyFileName      = "ca-key.pem"
	serverCertFileName = "server.pem"
	serverKeyFileName  = "server-key.pem"
)

// CAFile is the CA certificate in a TLS directory.
func CAFile(dir string) string { return filepath.Join(dir, CAFileName) }

// ServerTLS returns the bus's TLS configuration from dir, making the CA
// and a server certificate for hosts (names or IP addresses; loopback ones
// are always added) when missing. A server certificate that does not name
// every host is made again, with the same CA, so clients keep trusting it.
func ServerTLS(dir string, hosts []string) (*tls.Config, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	hosts = append([]string{"localhost", "127.0.0.1", "::1"}, hosts...)
	ca, caKey, err := loadOrMakeCA(dir)
	if err != nil {
		return nil, err
	}
	certPath, keyPath := filepath.Join(dir, serverCertFileName), filepath.Join(dir, serverKeyFileName)
	if cert, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil && covers(cert, hosts) {
		return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
	}
	if err := issueCert(ca, caKey, certPath, keyPath, "rbee bus", hosts, x509.ExtKeyUsageServerAuth); err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// NodeTLS makes, in dir, the CA (when missing) and a certificate for one
// server of a NATS cluster named name, reached at hosts: it serves clients
// and leaf nodes, and authenticates the server to its routes, so it is
// good for both ends of a TLS handshake. It returns the certificate's and
// key's paths.
func NodeTLS(dir, name string, hosts []string) (certPath, keyPath string, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", err
	}
	ca, caKey, err := loadOrMakeCA(dir)
	if err != nil {
		return "", "", err
	}
	hosts = append([]string{"localhost", "127.0.0.1", "::1"}, hosts...)
	certPath, keyPath = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	if cert, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil && covers(cert, hosts) {
		return certPath, keyPath, nil
	}
	err = issueCert(ca, caKey, certPath, keyPath, "rbee bus "+name, hosts, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	return certPath, keyPath, err
}

// issueCert signs a certificate for hosts (names or IP addresses) with the
// CA and writes it and its key.
func issueCert(ca *x509.Certificate, caKey *ecdsa.PrivateKey, certPath, keyPath, cn string, hosts []string, usage ...x509.ExtKeyUsage) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("sign a certificate for %s: %w", cn, err)
	}
	if err := writePEM(certPath, "CERTIFICATE", der); err != nil {
		return err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(keyPath, "EC PRIVATE KEY", kder)
}

// covers reports whether cert names every host.
func covers(cert tls.Certificate, hosts []string) bool {
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil || time.Now().After(leaf.NotAfter) {
		return false
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			if !slices.ContainsFunc(leaf.IPAddresses, ip.Equal) {
				return false
			}
		} else if h != "" && !slices.Contains(leaf.DNSNames, h) {
			return false
		}
	}
	return true
}

func loadOrMakeCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	caPath, keyPath := CAFile(dir), filepath.Join(dir, caKeyFileName)
	if pair, err := tls.LoadX509KeyPair(caPath, keyPath); err == nil {
		ca, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			return nil, nil, err
		}
		key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
		if !ok {
			return nil, nil, errors.New("the bus's CA key is not an ECDSA key")
		}
		return ca, key, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "rbee bus CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("make the bus's CA: %w", err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	if err := writePEM(keyPath, "EC PRIVATE KEY", kder); err != nil {
		return nil, nil, err
	}
	if err := writePEM(caPath, "CERTIFICATE", der); err != nil {
		return nil, nil, err
	}
	ca, err := x509.ParseCertificate(der)
	return ca, key, err
}

func writePEM(path, kind string, der []byte) error {
	return writeAtomic(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}))
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	return n
}

// Command gomtls makes one HTTPS request over mutual TLS between a Go server and a Go client,
// as two workloads built on Go's crypto/tls do: each holds a certificate chain from its CA
// and trusts a bundle of roots (its CA's /federation), the server requires and verifies a
// client certificate, the client checks the server's name.
//
// Usage: gomtls < EXCHANGE.json, where the JSON object on standard input is
//
//	{"serverName": "...", "server": PARTY, "client": PARTY}
//	PARTY = {"chain": "PEM, leaf first", "key": "PEM", "trust": "PEM roots"}
//
// (standard input, so that no private key is written to a file). On success it prints one
// JSON line: the status and what the server saw of the client (its common name and its
// issuer's). On a refused exchange it prints one JSON line with the client's error and the
// server's handshake error, and exits with status 1. Input it cannot use prints one line on
// stderr and exits with status 2. tests/test_go_client.py runs it.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gomtls: "+format+"\n", args...)
	os.Exit(2)
}

type party struct {
	Chain string `json:"chain"`
	Key   string `json:"key"`
	Trust string `json:"trust"`
}

type exchange struct {
	ServerName string `json:"serverName"`
	Server     party  `json:"server"`
	Client     party  `json:"client"`
}

// load is a party's certificate with its key, and its roots.
func load(role string, p party) (tls.Certificate, *x509.CertPool) {
	pair, err := tls.X509KeyPair([]byte(p.Chain), []byte(p.Key))
	if err != nil {
		fail("%s: %v", role, err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(p.Trust)) {
		fail("%s: the trust bundle holds no certificate", role)
	}
	return pair, roots
}

// lines collects what the server logs (its handshake errors) for the report.
type lines chan string

func (l lines) Write(p []byte) (int, error) {
	select {
	case l <- strings.TrimSpace(string(p)):
	default: // full: later lines add nothing the first ones did not say
	}
	return len(p), nil
}

func main() {
	var input exchange
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		fail("reading the exchange from standard input: %v", err)
	}
	serverIdentity, serverTrust := load("server", input.Server)
	clientIdentity, clientTrust := load("client", input.Client)
	serverTLS := &tls.Config{
		Certificates: []tls.Certificate{serverIdentity},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    serverTrust,
		MinVersion:   tls.VersionTLS12,
	}
	clientTLS := &tls.Config{
		Certificates: []tls.Certificate{clientIdentity},
		RootCAs:      clientTrust,
		ServerName:   input.ServerName,
		MinVersion:   tls.VersionTLS12,
	}

	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail("%v", err)
	}
	serverLog := make(lines, 8)
	server := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			peer := r.TLS.PeerCertificates[0]
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(map[string]string{
				"subject": peer.Subject.CommonName, "issuer": peer.Issuer.CommonName,
			})
		}),
		TLSConfig:         serverTLS,
		ErrorLog:          log.New(serverLog, "", 0),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = server.ServeTLS(listener, "", "") }()
	defer func() { _ = server.Shutdown(context.Background()) }()

	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: clientTLS}}
	response, err := client.Get("https://" + listener.Addr().String() + "/")
	if err == nil {
		defer response.Body.Close()
		body, readErr := io.ReadAll(response.Body)
		if readErr == nil {
			var seen map[string]string
			if json.Unmarshal(body, &seen) != nil {
				fail("the server answered %q", body)
			}
			out, _ := json.Marshal(map[string]any{"status": response.StatusCode, "peer": seen})
			fmt.Println(string(out))
			return
		}
		err = readErr
	}
	// A refusal: report the client's error and, once it is logged, the server's.
	report := map[string]any{"error": err.Error(), "server": ""}
	select {
	case line := <-serverLog:
		report["server"] = line
	case <-time.After(5 * time.Second):
	}
	out, _ := json.Marshal(report)
	fmt.Println(string(out))
	server.Close()
	os.Exit(1)
}

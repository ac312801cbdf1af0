// Command goclient talks to a step-ca compatible CA the way step's own Go clients do: Go's
// crypto/tls and net/http, one client with keep-alive, a P-256 key made in memory.
//
// Usage: goclient CA_URL ROOT_PEM TOKEN SUBJECT
//
// It asks for /health twice on one client (reporting whether the second request reused the
// connection), signs a CSR for SUBJECT with the one-time TOKEN, then renews the new
// certificate over mutual TLS. Each step prints one JSON line on stdout; any failure prints
// one line on stderr and exits with status 1. tests/test_go_client.py builds and runs it.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strings"
	"time"
)

type signResponse struct {
	Crt       string   `json:"crt"`
	CertChain []string `json:"certChain"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "goclient: "+format+"\n", args...)
	os.Exit(1)
}

func report(step string, fields map[string]any) {
	fields["step"] = step
	line, err := json.Marshal(fields)
	if err != nil {
		fail("%v", err)
	}
	fmt.Println(string(line))
}

func newClient(roots *x509.CertPool, identity []tls.Certificate) *http.Client {
	config := &tls.Config{RootCAs: roots, Certificates: identity, MinVersion: tls.VersionTLS12}
	return &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: config, ForceAttemptHTTP2: false},
	}
}

// call sends one request and returns the status, the body and whether the connection was
// reused from an earlier request.
func call(client *http.Client, method, url string, body []byte) (int, []byte, bool) {
	reused := false
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused }}
	request, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		fail("%v", err)
	}
	request = request.WithContext(httptrace.WithClientTrace(request.Context(), trace))
	if body != nil {
		request.Header.Set("Content-Type", "application/json")
	}
	response, err := client.Do(request)
	if err != nil {
		fail("%s %s: %v", method, url, err)
	}
	defer response.Body.Close()
	data, err := io.ReadAll(response.Body)
	if err != nil {
		fail("%s %s: reading the answer: %v", method, url, err)
	}
	return response.StatusCode, data, reused
}

// chainOf parses a sign or renew answer into the DER chain, leaf first.
func chainOf(step string, status int, data []byte) [][]byte {
	if status != http.StatusCreated {
		fail("%s: HTTP %d: %s", step, status, strings.TrimSpace(string(data)))
	}
	var answer signResponse
	if err := json.Unmarshal(data, &answer); err != nil {
		fail("%s: %v", step, err)
	}
	var chain [][]byte
	for _, text := range answer.CertChain {
		block, _ := pem.Decode([]byte(text))
		if block == nil {
			fail("%s: a certChain entry is not PEM", step)
		}
		chain = append(chain, block.Bytes)
	}
	if len(chain) == 0 {
		fail("%s: empty certChain", step)
	}
	return chain
}

func leafPEM(chain [][]byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: chain[0]}))
}

func main() {
	if len(os.Args) != 5 {
		fail("usage: goclient CA_URL ROOT_PEM TOKEN SUBJECT")
	}
	caURL, rootPath, token, subject := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	rootPEM, err := os.ReadFile(rootPath)
	if err != nil {
		fail("%v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		fail("%s holds no certificate", rootPath)
	}

	client := newClient(roots, nil)
	for i := 0; i < 2; i++ {
		status, _, reused := call(client, http.MethodGet, caURL+"/health", nil)
		report("health", map[string]any{"status": status, "reused": reused})
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail("%v", err)
	}
	template := &x509.CertificateRequest{Subject: pkix.Name{CommonName: subject}, DNSNames: []string{subject}}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, template, key)
	if err != nil {
		fail("%v", err)
	}
	csrPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})
	body, err := json.Marshal(map[string]string{"csr": string(csrPEM), "ott": token})
	if err != nil {
		fail("%v", err)
	}
	status, data, _ := call(client, http.MethodPost, caURL+"/1.0/sign", body)
	chain := chainOf("sign", status, data)
	report("sign", map[string]any{"crt": leafPEM(chain), "chain": len(chain)})

	identity := []tls.Certificate{{Certificate: chain, PrivateKey: key}}
	status, data, _ = call(newClient(roots, identity), http.MethodPost, caURL+"/1.0/renew", nil)
	renewed := chainOf("renew", status, data)
	report("renew", map[string]any{"crt": leafPEM(renewed), "chain": len(renewed)})
}

// Command goclient talks to a step-ca compatible CA the way step's own Go clients do: Go's
// crypto/tls and net/http, one client with keep-alive offering HTTP/2 (step's transport
// sets ForceAttemptHTTP2), a P-256 key made in memory.
//
// Usage: goclient CA_URL ROOT_PEM TOKEN SUBJECT
//
// It uses step's paths (no /1.0 prefix). It asks for /health twice on one client (reporting
// whether the second request reused the connection); fetches the root by its fingerprint
// over an unverified connection and checks the answer's fingerprint, as `step ca bootstrap`
// does, and a root the CA does not have; reads /version, /provisioners, /roots and
// /federation; signs a CSR for SUBJECT with the one-time TOKEN for one hour, then renews
// the new certificate over mutual TLS with the TLS settings the sign answer's tlsOptions
// give (as step's client does), and rekeys it with a new key over mutual TLS. Last it
// revokes the renewed certificate over mutual TLS and tries to renew it once more on the
// same connection, reporting that answer's status. Each step prints one JSON line on
// stdout; any failure prints one line on stderr and exits with status 1.
// tests/test_go_client.py builds and runs it.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptrace"
	"os"
	"strings"
	"time"
)

type tlsOptions struct {
	CipherSuites  []string `json:"cipherSuites"`
	MinVersion    float64  `json:"minVersion"`
	MaxVersion    float64  `json:"maxVersion"`
	Renegotiation bool     `json:"renegotiation"`
}

type rootResponse struct {
	CA string `json:"ca"`
}

type versionResponse struct {
	Version                     string `json:"version"`
	RequireClientAuthentication bool   `json:"requireClientAuthentication"`
}

type certsResponse struct {
	Certificates []string `json:"crts"`
}

type provisionersResponse struct {
	Provisioners []struct {
		Type string `json:"type"`
		Name string `json:"name"`
	} `json:"provisioners"`
	NextCursor string `json:"nextCursor"`
}

type signResponse struct {
	Crt        string      `json:"crt"`
	CertChain  []string    `json:"certChain"`
	TLSOptions *tlsOptions `json:"tlsOptions"`
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

func newClient(config *tls.Config) *http.Client {
	return &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: config, ForceAttemptHTTP2: true},
	}
}

// tlsVersion maps a tlsOptions version (1.2) to Go's constant; 0 for an unknown one.
func tlsVersion(v float64) uint16 {
	versions := map[float64]uint16{
		1.0: tls.VersionTLS10, 1.1: tls.VersionTLS11, 1.2: tls.VersionTLS12, 1.3: tls.VersionTLS13,
	}
	return versions[math.Round(v*10)/10]
}

// renewConfig is the TLS configuration step's client derives from a sign answer: the
// tlsOptions' cipher suites (Go's names), versions and renegotiation, or TLS 1.2 at least
// when the answer has none. An unknown cipher suite or version is a failure here.
func renewConfig(options *tlsOptions, roots *x509.CertPool, identity tls.Certificate) *tls.Config {
	config := &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{identity}}
	if options == nil {
		config.MinVersion = tls.VersionTLS12
		return config
	}
	known := map[string]uint16{}
	for _, suite := range append(tls.CipherSuites(), tls.InsecureCipherSuites()...) {
		known[suite.Name] = suite.ID
	}
	for _, name := range options.CipherSuites {
		id, ok := known[name]
		if !ok {
			fail("tlsOptions: unknown cipher suite %q", name)
		}
		config.CipherSuites = append(config.CipherSuites, id)
	}
	config.MinVersion, config.MaxVersion = tlsVersion(options.MinVersion), tlsVersion(options.MaxVersion)
	if config.MinVersion == 0 || config.MaxVersion == 0 {
		fail("tlsOptions: unknown TLS version in %v", *options)
	}
	if options.Renegotiation {
		config.Renegotiation = tls.RenegotiateFreelyAsClient
	}
	return config
}

// call sends one request and returns the status, the body, whether the connection was
// reused from an earlier request, and the HTTP version spoken.
func call(client *http.Client, method, url string, body []byte) (int, []byte, bool, string) {
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
	return response.StatusCode, data, reused, response.Proto
}

// signed parses a sign or renew answer: the DER chain, leaf first, and its tlsOptions.
func signed(step string, status int, data []byte) ([][]byte, *tlsOptions) {
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
	return chain, answer.TLSOptions
}

// decode reads a JSON answer that must have the given status.
func decode(step string, status, want int, data []byte, into any) {
	if status != want {
		fail("%s: HTTP %d: %s", step, status, strings.TrimSpace(string(data)))
	}
	if err := json.Unmarshal(data, into); err != nil {
		fail("%s: %v", step, err)
	}
}

// csrFor is a PEM certificate request for subject (common name and DNS name) signed by key.
func csrFor(key *ecdsa.PrivateKey, subject string) string {
	template := &x509.CertificateRequest{Subject: pkix.Name{CommonName: subject}, DNSNames: []string{subject}}
	der, err := x509.CreateCertificateRequest(rand.Reader, template, key)
	if err != nil {
		fail("%v", err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

func leafPEM(chain [][]byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: chain[0]}))
}

// bootstrap fetches the root by its fingerprint as `step ca bootstrap` does, over an
// unverified connection (the fingerprint check is what trusts the answer), then asks for a
// fingerprint the CA does not have.
func bootstrap(caURL, rootSum string) {
	insecure := newClient(&tls.Config{InsecureSkipVerify: true})
	status, data, _, _ := call(insecure, http.MethodGet, caURL+"/root/"+rootSum, nil)
	var root rootResponse
	decode("root", status, http.StatusOK, data, &root)
	block, _ := pem.Decode([]byte(root.CA))
	if block == nil {
		fail("root: the answer holds no PEM certificate")
	}
	report("root", map[string]any{"status": status, "matches": fingerprint(block.Bytes) == rootSum})
	status, data, _, _ = call(insecure, http.MethodGet, caURL+"/root/"+strings.Repeat("0", 64), nil)
	report("root-unknown", map[string]any{"status": status, "body": strings.TrimSpace(string(data))})
}

// readPublic reads what any client may: the version, the provisioners, the roots and the
// federation.
func readPublic(client *http.Client, caURL string) {
	var version versionResponse
	status, data, _, _ := call(client, http.MethodGet, caURL+"/version", nil)
	decode("version", status, http.StatusOK, data, &version)
	report("version", map[string]any{
		"version": version.Version, "requireClientAuthentication": version.RequireClientAuthentication,
	})
	var provisioners provisionersResponse
	status, data, _, _ = call(client, http.MethodGet, caURL+"/provisioners", nil)
	decode("provisioners", status, http.StatusOK, data, &provisioners)
	var names []string
	for _, p := range provisioners.Provisioners {
		names = append(names, p.Type+":"+p.Name)
	}
	report("provisioners", map[string]any{"names": names, "nextCursor": provisioners.NextCursor})
	for _, path := range []string{"/roots", "/federation"} {
		var certs certsResponse
		status, data, _, _ = call(client, http.MethodGet, caURL+path, nil)
		decode(path, status, http.StatusCreated, data, &certs)
		var sums []string
		for _, text := range certs.Certificates {
			block, _ := pem.Decode([]byte(text))
			if block == nil {
				fail("%s: an entry is not PEM", path)
			}
			sums = append(sums, fingerprint(block.Bytes))
		}
		report(strings.TrimPrefix(path, "/"), map[string]any{"fingerprints": sums})
	}
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
	block, _ := pem.Decode(rootPEM)
	if block == nil || !roots.AppendCertsFromPEM(rootPEM) {
		fail("%s holds no certificate", rootPath)
	}
	rootSum := fingerprint(block.Bytes)

	client := newClient(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12})
	for i := 0; i < 2; i++ {
		status, _, reused, proto := call(client, http.MethodGet, caURL+"/health", nil)
		report("health", map[string]any{"status": status, "reused": reused, "proto": proto})
	}

	bootstrap(caURL, rootSum)
	readPublic(client, caURL)

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail("%v", err)
	}
	// As step's client marshals its SignRequest (an unset time is ""); --not-after 1h.
	body, err := json.Marshal(map[string]string{
		"csr": csrFor(key, subject), "ott": token, "notBefore": "", "notAfter": "1h",
	})
	if err != nil {
		fail("%v", err)
	}
	status, data, _, _ := call(client, http.MethodPost, caURL+"/sign", body)
	chain, options := signed("sign", status, data)
	report("sign", map[string]any{"crt": leafPEM(chain), "chain": len(chain), "tlsOptions": options != nil})

	config := renewConfig(options, roots, tls.Certificate{Certificate: chain, PrivateKey: key})
	status, data, _, proto := call(newClient(config), http.MethodPost, caURL+"/renew", nil)
	renewed, _ := signed("renew", status, data)
	report("renew", map[string]any{"crt": leafPEM(renewed), "chain": len(renewed), "proto": proto})

	// step ca rekey: mutual TLS with the current certificate, a CSR for a new key.
	mtls := newClient(renewConfig(options, roots, tls.Certificate{Certificate: renewed, PrivateKey: key}))
	newKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail("%v", err)
	}
	body, err = json.Marshal(map[string]string{"csr": csrFor(newKey, subject)})
	if err != nil {
		fail("%v", err)
	}
	status, data, _, _ = call(mtls, http.MethodPost, caURL+"/rekey", body)
	rekeyed, _ := signed("rekey", status, data)
	rekeyedLeaf, err := x509.ParseCertificate(rekeyed[0])
	if err != nil {
		fail("rekey: %v", err)
	}
	report("rekey", map[string]any{
		"crt": leafPEM(rekeyed), "chain": len(rekeyed), "newKey": newKey.PublicKey.Equal(rekeyedLeaf.PublicKey),
	})

	// step ca revoke --cert --key: mutual TLS with the certificate being revoked.
	leaf, err := x509.ParseCertificate(renewed[0])
	if err != nil {
		fail("renew: %v", err)
	}
	revoke, err := json.Marshal(map[string]any{
		"serial": leaf.SerialNumber.String(), "reasonCode": 0, "reason": "", "passive": true,
	})
	if err != nil {
		fail("%v", err)
	}
	status, data, _, _ = call(mtls, http.MethodPost, caURL+"/revoke", revoke)
	if status != http.StatusOK {
		fail("revoke: HTTP %d: %s", status, strings.TrimSpace(string(data)))
	}
	report("revoke", map[string]any{"status": status, "body": strings.TrimSpace(string(data))})
	status, data, reused, _ := call(mtls, http.MethodPost, caURL+"/renew", nil)
	report("renew-revoked", map[string]any{"status": status, "reused": reused, "body": strings.TrimSpace(string(data))})
}

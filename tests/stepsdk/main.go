// Command stepsdk runs step's own Go SDK (github.com/smallstep/certificates/ca, the library
// behind step's clients and the federation tutorial's demo server and client) against a CA,
// so that the federatls CA is checked by the code step's users run, not by a copy of it.
// It is built from Debian's packages, as ../shared/tools/stepca/build.sh builds step-ca.
//
// Usage:
//
//	stepsdk token CA_URL ROOT_FILE PROVISIONER KID SUBJECT [SAN...] < PASSWORD
//	stepsdk server [-own-roots] < TOKEN
//	stepsdk client [-own-roots] [-count N] [-every DURATION] URL < TOKEN
//	stepsdk api < TOKEN
//
// token: ca.NewProvisioner fetches the provisioner's encrypted key from the CA (by name
// through /provisioners when KID is "", by kid through /provisioners/{kid}/encrypted-key
// otherwise), decrypts it with the password and mints a one-time token, as `step ca token`
// does; it prints the token.
//
// server: ca.BootstrapServer enrols with the token and serves HTTPS on 127.0.0.1 (a free
// port), requiring client certificates chained to the CA's /federation bundle
// (ca.AddFederationToClientCAs, as the tutorial's server does) or, with -own-roots, to its
// /roots only. It prints one JSON line when it listens (its address, the common names of
// the roots it accepts and its certificate's serial number), and answers each request as the tutorial's server does,
// "Hello NAME (cert issued by 'ROOT')", with the client certificate's serial number in a
// Client-Serial header.
//
// client: ca.BootstrapClient enrols with the token and sends COUNT requests to URL, each on
// a new connection, trusting the /federation bundle (ca.AddFederationToRootCAs) or, with
// -own-roots, the CA's /roots only. It prints one JSON line per request (the answer or the
// error, the serial number of the certificate it presented and, from the answer, the
// serial numbers the server presented and saw) and exits with status 1 if any failed.
//
// api: step's typed client (ca.Client) bootstraps from the token (the root by its
// fingerprint), reads /health, /root/{sha}, /version, /provisioners, /roots and /federation,
// signs a CSR made from the token (ca.CreateSignRequest), renews over mutual TLS, rekeys with
// a new key, revokes the rekeyed certificate over mutual TLS (passive) and tries to renew it.
// It prints one JSON line per step; a step that fails prints its error, with the CA's status
// and message when the CA refused, and ends the program with status 1. The last step, the
// renewal of the revoked certificate, must fail.
//
// The SDK renews the certificate at about two thirds of its lifetime, and fetches the roots
// again when it does. Tokens and passwords come on standard input, never in a file or on
// the command line. Usage errors print one line on stderr and exit with status 2.
package main

import (
	"bufio"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/smallstep/certificates/api"
	"github.com/smallstep/certificates/ca"
	"github.com/smallstep/certificates/errs"
)

func usage(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "stepsdk: "+format+"\n", args...)
	os.Exit(2)
}

func emit(v any) {
	line, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(line))
}

// secret is the first line of standard input.
func secret() string {
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && err != io.EOF {
		usage("reading standard input: %v", err)
	}
	line = strings.TrimSpace(line)
	if line == "" {
		usage("standard input is empty")
	}
	return line
}

func commonName(cert *x509.Certificate) string {
	return cert.Subject.CommonName
}

// subjectCN is the common name in a DER-encoded subject.
func subjectCN(der []byte) string {
	var rdns pkix.RDNSequence
	if _, err := asn1.Unmarshal(der, &rdns); err != nil {
		return ""
	}
	var name pkix.Name
	name.FillFromRDNSequence(&rdns)
	return name.CommonName
}

// rootOf is the common name of the root a verified chain ends in.
func rootOf(chains [][]*x509.Certificate) string {
	if len(chains) == 0 || len(chains[0]) == 0 {
		return ""
	}
	chain := chains[0]
	return commonName(chain[len(chain)-1])
}

func token(args []string) {
	if len(args) < 5 {
		usage("token CA_URL ROOT_FILE PROVISIONER KID SUBJECT [SAN...] < PASSWORD")
	}
	caURL, root, name, kid, subject := args[0], args[1], args[2], args[3], args[4]
	p, err := ca.NewProvisioner(name, kid, caURL, []byte(secret()), ca.WithRootFile(root))
	if err != nil {
		fmt.Fprintf(os.Stderr, "stepsdk: provisioner: %v\n", err)
		os.Exit(1)
	}
	tok, err := p.Token(subject, args[5:]...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stepsdk: token: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(tok)
}

func server(args []string) {
	flags := flag.NewFlagSet("server", flag.ExitOnError)
	ownRoots := flags.Bool("own-roots", false, "trust the CA's /roots only, not /federation")
	_ = flags.Parse(args)
	options := []ca.TLSOption{ca.RequireAndVerifyClientCert()}
	if !*ownRoots {
		options = append(options, ca.AddFederationToClientCAs())
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		peer := r.TLS.PeerCertificates[0]
		w.Header().Set("Client-Serial", peer.SerialNumber.String())
		fmt.Fprintf(w, "Hello %s (cert issued by '%s')\n", commonName(peer), rootOf(r.TLS.VerifiedChains))
	})
	srv, err := ca.BootstrapServer(context.Background(), secret(), &http.Server{
		Handler: handler,
	}, options...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stepsdk: bootstrap: %v\n", err)
		os.Exit(1)
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintf(os.Stderr, "stepsdk: listen: %v\n", err)
		os.Exit(1)
	}
	// The roots the server accepts client certificates from, as the next handshake sees them.
	config, err := srv.TLSConfig.GetConfigForClient(&tls.ClientHelloInfo{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "stepsdk: tls config: %v\n", err)
		os.Exit(1)
	}
	accepts := []string{}
	for _, der := range config.ClientCAs.Subjects() { //nolint:staticcheck // names only
		accepts = append(accepts, subjectCN(der))
	}
	own, err := config.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		fmt.Fprintf(os.Stderr, "stepsdk: certificate: %v\n", err)
		os.Exit(1)
	}
	emit(map[string]any{
		"event": "listening", "addr": listener.Addr().String(), "accepts": accepts,
		"serial": own.Leaf.SerialNumber.String(),
	})
	err = srv.ServeTLS(listener, "", "")
	fmt.Fprintf(os.Stderr, "stepsdk: serve: %v\n", err)
	os.Exit(1)
}

func client(args []string) {
	flags := flag.NewFlagSet("client", flag.ExitOnError)
	ownRoots := flags.Bool("own-roots", false, "trust the CA's /roots only, not /federation")
	count := flags.Int("count", 1, "how many requests to send")
	every := flags.Duration("every", time.Second, "the pause between two requests")
	_ = flags.Parse(args)
	if flags.NArg() != 1 {
		usage("client [-own-roots] [-count N] [-every DURATION] URL < TOKEN")
	}
	url := flags.Arg(0)
	var options []ca.TLSOption
	if !*ownRoots {
		options = append(options, ca.AddFederationToRootCAs())
	}
	httpClient, err := ca.BootstrapClient(context.Background(), secret(), options...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stepsdk: bootstrap: %v\n", err)
		os.Exit(1)
	}
	// The certificate the client presents now (the SDK's renewer swaps it when it renews).
	current := httpClient.Transport.(*http.Transport).TLSClientConfig.GetClientCertificate
	failed := false
	for i := 0; i < *count; i++ {
		if i > 0 {
			time.Sleep(*every)
		}
		own, err := current(&tls.CertificateRequestInfo{})
		if err != nil {
			fmt.Fprintf(os.Stderr, "stepsdk: certificate: %v\n", err)
			os.Exit(1)
		}
		ownSerial := own.Leaf.SerialNumber.String()
		httpClient.CloseIdleConnections() // a new handshake each time, as a new caller makes
		resp, err := httpClient.Get(url)
		if err != nil {
			emit(map[string]any{"error": err.Error(), "ownSerial": ownSerial})
			failed = true
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		emit(map[string]any{
			"status": resp.StatusCode, "body": strings.TrimSpace(string(body)),
			"server":       commonName(resp.TLS.PeerCertificates[0]),
			"serverSerial": resp.TLS.PeerCertificates[0].SerialNumber.String(),
			"serverRoot":   rootOf(resp.TLS.VerifiedChains),
			"clientSerial": resp.Header.Get("Client-Serial"),
			"ownSerial":    ownSerial,
		})
	}
	if failed {
		os.Exit(1)
	}
}

// withCert is an HTTP transport that presents a certificate and trusts the CA's root, as
// step's commands build one from a certificate and its key to renew, rekey or revoke.
func withCert(client *ca.Client, cert *tls.Certificate) *http.Transport {
	return &http.Transport{TLSClientConfig: &tls.Config{
		Certificates: []tls.Certificate{*cert},
		RootCAs:      client.GetRootCAs(),
		MinVersion:   tls.VersionTLS12,
	}}
}

// certificate is the leaf of a sign answer with a key, or the end of the program.
func certificate(step string, sign *api.SignResponse, key crypto.PrivateKey) *tls.Certificate {
	cert, err := ca.TLSCertificate(sign, key)
	if err != nil {
		failStep(step, err)
	}
	return cert
}

// failStep prints a step's error (with the CA's status when the CA refused) and exits 1.
func failStep(step string, err error) {
	line := map[string]any{"step": step, "error": err.Error()}
	var refusal *errs.Error
	if errors.As(err, &refusal) {
		line["status"] = refusal.StatusCode()
		line["message"] = refusal.Message()
	}
	emit(line)
	os.Exit(1)
}

func serial(sign *api.SignResponse) string {
	return sign.ServerPEM.SerialNumber.String()
}

// apiCalls walks step's typed client (ca.Client) through what step's commands do with it:
// bootstrap from the token, the public reads, sign, renew, rekey and revoke over mutual TLS,
// then a renewal of the revoked certificate, which must fail.
func apiCalls(args []string) {
	if len(args) != 0 {
		usage("api < TOKEN")
	}
	token := secret()
	client, err := ca.Bootstrap(token) // GET /root/{sha} over an unverified connection
	if err != nil {
		failStep("bootstrap", err)
	}
	fingerprint, err := client.RootFingerprint()
	if err != nil {
		failStep("bootstrap", err)
	}
	emit(map[string]any{"step": "bootstrap", "fingerprint": fingerprint})
	health, err := client.Health()
	if err != nil {
		failStep("health", err)
	}
	emit(map[string]any{"step": "health", "status": health.Status})
	root, err := client.Root(fingerprint)
	if err != nil {
		failStep("root", err)
	}
	emit(map[string]any{"step": "root", "subject": root.RootPEM.Subject.CommonName})
	version, err := client.Version()
	if err != nil {
		failStep("version", err)
	}
	emit(map[string]any{
		"step": "version", "version": version.Version,
		"requireClientAuthentication": version.RequireClientAuthentication,
	})
	provisioners, err := client.Provisioners()
	if err != nil {
		failStep("provisioners", err)
	}
	names := []string{}
	for _, p := range provisioners.Provisioners {
		names = append(names, p.GetName())
	}
	emit(map[string]any{"step": "provisioners", "names": names, "nextCursor": provisioners.NextCursor})
	roots, err := client.Roots()
	if err != nil {
		failStep("roots", err)
	}
	emit(map[string]any{"step": "roots", "count": len(roots.Certificates)})
	federation, err := client.Federation()
	if err != nil {
		failStep("federation", err)
	}
	emit(map[string]any{"step": "federation", "count": len(federation.Certificates)})

	request, key, err := ca.CreateSignRequest(token)
	if err != nil {
		failStep("sign", err)
	}
	signed, err := client.Sign(request)
	if err != nil {
		failStep("sign", err)
	}
	emit(map[string]any{
		"step": "sign", "serial": serial(signed), "subject": signed.ServerPEM.Subject.CommonName,
		"chain": len(signed.CertChainPEM), "tlsOptions": signed.TLSOptions != nil,
	})
	renewed, err := client.Renew(withCert(client, certificate("renew", signed, key)))
	if err != nil {
		failStep("renew", err)
	}
	emit(map[string]any{"step": "renew", "serial": serial(renewed)})
	csr, newKey, err := ca.CreateCertificateRequest(signed.ServerPEM.Subject.CommonName)
	if err != nil {
		failStep("rekey", err)
	}
	rekeyed, err := client.Rekey(&api.RekeyRequest{CsrPEM: *csr},
		withCert(client, certificate("rekey", renewed, key)))
	if err != nil {
		failStep("rekey", err)
	}
	emit(map[string]any{"step": "rekey", "serial": serial(rekeyed)})
	current := certificate("revoke", rekeyed, newKey)
	revoked, err := client.Revoke(&api.RevokeRequest{Serial: serial(rekeyed), Passive: true},
		withCert(client, current))
	if err != nil {
		failStep("revoke", err)
	}
	emit(map[string]any{"step": "revoke", "status": revoked.Status})
	again, err := client.Renew(withCert(client, current))
	if err == nil {
		emit(map[string]any{"step": "renew-revoked", "serial": serial(again)})
		os.Exit(1)
	}
	failStep("renew-revoked", err)
}

func main() {
	if len(os.Args) < 2 {
		usage("token|server|client|api ...")
	}
	switch os.Args[1] {
	case "token":
		token(os.Args[2:])
	case "server":
		server(os.Args[2:])
	case "client":
		client(os.Args[2:])
	case "api":
		apiCalls(os.Args[2:])
	default:
		usage("unknown command %q: token, server, client or api", os.Args[1])
	}
}

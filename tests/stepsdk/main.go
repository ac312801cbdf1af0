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
// The SDK renews the certificate at about two thirds of its lifetime, and fetches the roots
// again when it does. Tokens and passwords come on standard input, never in a file or on
// the command line. Usage errors print one line on stderr and exit with status 2.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/smallstep/certificates/ca"
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

func main() {
	if len(os.Args) < 2 {
		usage("token|server|client ...")
	}
	switch os.Args[1] {
	case "token":
		token(os.Args[2:])
	case "server":
		server(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		usage("unknown command %q: token, server or client", os.Args[1])
	}
}

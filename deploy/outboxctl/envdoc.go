package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"

	"github.com/outboxfn/outbox/functions/createuser"
	"github.com/outboxfn/outbox/functions/relay"
	"github.com/outboxfn/outbox/functions/sendemail"
	"github.com/outboxfn/outbox/shared/config"
	"github.com/outboxfn/outbox/shared/serve"
)

const (
	envdocBegin = "<!-- BEGIN GENERATED CONFIG: make docs -->"
	envdocEnd   = "<!-- END GENERATED CONFIG -->"
)

// configSpecs lists every config struct a binary of this repository reads,
// in the order the README presents them.
var configSpecs = []struct {
	title string
	spec  any
}{
	{"Every server (`local/serve` and each function's own binary)", &serve.Config{}},
	{"createuser", &createuser.Config{}},
	{"relay", &relay.Config{}},
	{"sendemail", &sendemail.Config{}},
	{"outboxctl", &Config{}},
}

// envdoc renders the configuration section.
func envdoc() (string, error) {
	var b strings.Builder
	b.WriteString(envdocBegin + "\n")
	for _, s := range configSpecs {
		fmt.Fprintf(&b, "\n#### %s\n\n", s.title)
		if err := config.Markdown(&b, s.spec); err != nil {
			return "", err
		}
	}
	b.WriteString("\n" + envdocEnd)
	return b.String(), nil
}

// writeEnvdoc replaces the generated section of the file at path.
func writeEnvdoc(path string) error {
	readme, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	updated, err := replaceEnvdoc(readme)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return os.WriteFile(path, updated, 0o644)
}

func replaceEnvdoc(readme []byte) ([]byte, error) {
	begin := bytes.Index(readme, []byte(envdocBegin))
	end := bytes.Index(readme, []byte(envdocEnd))
	if begin < 0 || end < begin {
		return nil, fmt.Errorf("markers %q and %q not found", envdocBegin, envdocEnd)
	}
	doc, err := envdoc()
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	out.Write(readme[:begin])
	out.WriteString(doc)
	out.Write(readme[end+len(envdocEnd):])
	return out.Bytes(), nil
}

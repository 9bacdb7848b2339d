// Package config reads a function's settings from the environment once, at
// start-up, and fails with a message that names the offending variable.
//
// Each function declares one struct whose fields carry envconfig tags:
// `envconfig:"NAME"` for the variable, `default:"…"` and `desc:"…"`, the
// latter ending with the default so that the generated README table reads
// well. [Markdown] renders such structs as that table.
package config

import (
	"fmt"
	"io"
	"strings"

	"github.com/kelseyhightower/envconfig"
)

// Validator is implemented by config structs that check relations between
// fields envconfig cannot express (ranges, one value below another).
type Validator interface {
	Validate() error
}

// Load fills spec from the environment and validates it.
func Load(spec any) error {
	if err := envconfig.Process("", spec); err != nil {
		// envconfig's message already names the variable and the bad value.
		return fmt.Errorf("read configuration: %w", err)
	}
	if v, ok := spec.(Validator); ok {
		if err := v.Validate(); err != nil {
			return fmt.Errorf("invalid configuration: %w", err)
		}
	}
	return nil
}

// markdownRow is one table row per variable; envconfig fills the template.
const markdownRow = `{{range .}}| ` + "`{{usage_key .}}`" + ` | {{usage_type .}} | {{with usage_default .}}` + "`{{.}}`" + `{{end}} | {{usage_description .}} |
{{end}}`

// Markdown writes spec's variables as the rows of a Markdown table with the
// columns variable, type, default, description. It is what `make docs` puts
// in the README, so the README cannot drift from the code.
func Markdown(w io.Writer, spec any) error {
	var b strings.Builder
	b.WriteString("| Variable | Type | Default | Description |\n|---|---|---|---|\n")
	if err := envconfig.Usagef("", spec, &b, markdownRow); err != nil {
		return fmt.Errorf("render %T: %w", spec, err)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Variables returns the names of the environment variables spec reads.
func Variables(spec any) ([]string, error) {
	var b strings.Builder
	if err := envconfig.Usagef("", spec, &b, "{{range .}}{{usage_key .}}\n{{end}}"); err != nil {
		return nil, fmt.Errorf("list variables of %T: %w", spec, err)
	}
	return strings.Fields(b.String()), nil
}

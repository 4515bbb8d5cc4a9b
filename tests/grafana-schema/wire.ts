// A value of type T as it travels in JSON: string enums become the union of
// their string values (JSON cannot name an enum), everything else keeps
// its shape, so excess and missing keys are still errors.
export type Wire<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Wire<U>>
      : T extends object
        ? { [K in keyof T]: Wire<T[K]> }
        : T;
